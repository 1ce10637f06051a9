"""The daemon's configuration: a TOML file, validated at start-up.

Every key is optional; an unknown key or a value of the wrong type is a
ConfigError naming the key, so a typo never silently weakens policy.
examples/dmabufd.toml documents every key.
"""

from __future__ import annotations

import grp
import ipaddress
import logging
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dmabufd.errors import ConfigError
from dmabufd.heaps import dma_heap_json
from dmabufd.heaps.dma_heap_json import DmaHeapJsonError, DmaHeapsInfo
from dmabufd_common import npu
from dmabufd_common.cpus import format_cpus, parse_cpus
from dmabufd_common.fdwire import MAX_FDS_PER_FRAME
from dmabufd_common.units import parse_size

log = logging.getLogger(__name__)

DEFAULT_ALIASES: dict[str, tuple[str, ...]] = {
    # Android kernels add an uncached system heap; elsewhere the cached one serves.
    "system-uncached": ("system-uncached", "system"),
    # The CMA heap is named after its region; 6.17 renamed the default one.
    "cma": ("default_cma_region", "linux,cma", "reserved", "default-pool"),
}
DEFAULT_PROBE_ORDER: tuple[str, ...] = ("system", "udmabuf", "memfd")
DEFAULT_USAGE: dict[str, tuple[str, ...]] = {
    "camera": ("cma", "system", "udmabuf", "memfd"),
    # Every NPU buffer type's usage (model-weights among them): the routes
    # that apply where dma_heap.json names no present heap for the type.
    **{usage: ("system", "udmabuf", "memfd") for usage in npu.USAGES.values()},
    "cpu": ("memfd",),
}


@dataclass(frozen=True)
class Quota:
    max_bytes: int
    max_buffers: int


@dataclass(frozen=True)
class AccessRule:
    """Who may allocate from one heap. Empty lists on both: nobody."""

    uids: frozenset[int]
    gids: frozenset[int]

    def allows(self, uid: int, gids: frozenset[int]) -> bool:
        return uid in self.uids or bool(self.gids & gids)


@dataclass(frozen=True)
class SocketPolicy:
    mode: int = 0o666
    group: int | None = None


@dataclass(frozen=True)
class ClientPolicy:
    """Who may open a session at all (None: anyone who reaches the socket),
    and who may see every client's accounting."""

    allowed: AccessRule | None = None
    admins: AccessRule = AccessRule(frozenset({0}), frozenset())


@dataclass(frozen=True)
class DiscoveryConfig:
    source: str = "auto"  # auto | udev | scan
    dev_root: Path = Path("/dev")
    sys_root: Path = Path("/sys")
    rescan_interval_s: float = 2.0
    memfd: bool = True


@dataclass(frozen=True)
class HeapConfig:
    probe_order: tuple[str, ...] = DEFAULT_PROBE_ORDER
    aliases: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(DEFAULT_ALIASES))
    usage: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(DEFAULT_USAGE))
    access: dict[str, AccessRule] = field(default_factory=dict)
    # 0: the machine's physical memory.
    max_buffer_bytes: int = 0
    max_batch: int = 1024
    # Android's NPU heap map, and the file it was read from (None: none was).
    dma_heap_json: Path | None = None
    npu: DmaHeapsInfo | None = None
    # Sizes of the memfds the memfd heap keeps prepared (heaps/reserve.py);
    # empty: none. They hold their sum in memory while idle.
    memfd_reserve: tuple[int, ...] = ()


# The kinds of buffer a load can fill, as loading.<kind> tables name them.
LOAD_KINDS = ("memfd", "udmabuf", "dma-heap")


@dataclass(frozen=True)
class LoadProfile:
    """How one kind of buffer is loaded: I/O requests kept in flight, and
    the size of each."""

    parallelism: int
    chunk_bytes: int


@dataclass(frozen=True)
class LoadingConfig:
    # Directories under which clients may name files by path (opened with
    # the client's credentials). Empty: clients must send an fd.
    roots: tuple[Path, ...] = ()
    # I/O requests kept in flight per load, and the size of each, for every
    # kind of buffer without a profile of its own in `kinds`. A request into
    # memory maps its chunk while it runs (or, O_DIRECT into a memfd, goes
    # through a 2 MiB bounce buffer), so the daemon's resident memory peaks
    # at parallelism x chunk_bytes at most.
    parallelism: int = 8
    chunk_bytes: int = 16 << 20
    # Per kind of buffer (LOAD_KINDS): its own parallelism and chunk_bytes.
    kinds: dict[str, LoadProfile] = field(default_factory=dict)
    # Copy chunks the page cache holds already from it (cachestat), instead
    # of reading them from the device again.
    page_cache: bool = True
    # Resident shared models (LoadModel) may use this much memory in all.
    model_budget_bytes: int = 2 << 30
    # Released image pools kept warm for reuse may hold this much in all.
    pool_recycle_budget_bytes: int = 256 << 20
    # A safetensors header is untrusted: its size and tensor count are capped.
    max_header_bytes: int = 16 << 20
    max_tensors: int = 65536

    def profile(self, kind: str) -> LoadProfile:
        return self.kinds.get(kind) or LoadProfile(self.parallelism, self.chunk_bytes)


@dataclass(frozen=True)
class LimitsConfig:
    """What one uid may hold of the daemon itself (quotas bound memory;
    these bound sessions, calls, streams and the daemon's own fds)."""

    sessions_per_uid: int = 64
    # RPCs in flight, ticket waits included; WatchHeaps streams count apart.
    calls_per_uid: int = 32
    watches_per_uid: int = 1024
    # Loads of one uid that run at once; more wait their turn.
    loads_per_uid: int = 2
    # Threads of the calls executor one uid's blocking calls may use at once.
    threads_per_uid: int = 2
    # A client that lets this many frames queue, or one frame wait this
    # long, unread on its fd socket loses its session.
    outbox_frames: int = 64
    outbox_stall_s: float = 5.0
    grant_buffers: int = 256


@dataclass(frozen=True)
class MetricsConfig:
    """Where to serve metrics in the Prometheus text format: a loopback
    TCP address, or a Unix socket (relative: in the runtime directory).
    Neither: metrics are off (the default)."""

    listen: tuple[str, int] | None = None
    unix: Path | None = None
    # Mode of the Unix socket file: a scraper needs write permission on it.
    unix_mode: int = 0o600

    @property
    def enabled(self) -> bool:
        return self.listen is not None or self.unix is not None


@dataclass(frozen=True)
class SchedulingConfig:
    """Where the daemon's threads run (service/dmabufd/placement.py)."""

    # The CPUs the event loop and the `call` threads run on (None: wherever
    # the kernel puts them, as it does every other thread of the daemon).
    call_cpus: frozenset[int] | None = None
    # The event loop's nice; every other thread keeps the daemon's. -4 is
    # Android's ANDROID_PRIORITY_DISPLAY. Never above the daemon's own.
    loop_nice: int = -4


@dataclass(frozen=True)
class Config:
    sockets: SocketPolicy = SocketPolicy()
    clients: ClientPolicy = ClientPolicy()
    discovery: DiscoveryConfig = DiscoveryConfig()
    heaps: HeapConfig = HeapConfig()
    loading: LoadingConfig = LoadingConfig()
    limits: LimitsConfig = LimitsConfig()
    metrics: MetricsConfig = MetricsConfig()
    scheduling: SchedulingConfig = SchedulingConfig()
    default_quota: Quota = Quota(max_bytes=4 << 30, max_buffers=4096)
    uid_quotas: dict[int, Quota] = field(default_factory=dict)

    def quota_for(self, uid: int) -> Quota:
        return self.uid_quotas.get(uid, self.default_quota)


class _Table:
    """A TOML table being read: typed getters that remember what was read,
    so leftovers (typos) are reported by name."""

    def __init__(self, data: dict[str, Any], path: str) -> None:
        self._data = data
        self._path = path
        self._seen: set[str] = set()

    def _get(self, key: str, kinds: tuple[type, ...], what: str) -> Any:
        self._seen.add(key)
        value = self._data.get(key)
        # bool is an int in Python; only accept it where a flag is expected.
        wrong_type = not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)
        if value is not None and wrong_type:
            raise ConfigError(f"{self._where(key)} must be {what}, not {value!r}")
        return value

    def _where(self, key: str) -> str:
        return f"{self._path}.{key}" if self._path else key

    def table(self, key: str) -> _Table:
        value = self._get(key, (dict,), "a table")
        return _Table(value or {}, self._where(key))

    def string(self, key: str, default: str) -> str:
        value = self._get(key, (str,), "a string")
        return default if value is None else str(value)

    def number(self, key: str, default: float) -> float:
        value = self._get(key, (int, float), "a number")
        return default if value is None else float(value)

    def flag(self, key: str, default: bool) -> bool:
        value = self._get(key, (bool,), "true or false")
        return default if value is None else bool(value)

    def size(self, key: str, default: int) -> int:
        value = self._get(key, (int, str), 'a size (bytes, or a string like "64M")')
        if value is None:
            return default
        try:
            return parse_size(value)
        except ValueError as error:
            raise ConfigError(f"{self._where(key)}: {error}") from None

    def sizes(self, key: str) -> tuple[int, ...]:
        value = self._get(key, (list,), 'a list of sizes (bytes, or strings like "64M")')
        try:
            return tuple(parse_size(item) for item in value or [])
        except (ValueError, TypeError) as error:
            raise ConfigError(f"{self._where(key)}: {error}") from None

    def names(self, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = self._get(key, (list,), "a list of strings")
        if value is None:
            return default
        if not all(isinstance(item, str) and item for item in value):
            raise ConfigError(f"{self._where(key)} must be a list of non-empty strings")
        return tuple(value)

    def ids(self, key: str, lookup_group: bool = False) -> frozenset[int]:
        value = self._get(key, (list,), "a list of ids")
        result: set[int] = set()
        for item in value or []:
            if isinstance(item, int) and not isinstance(item, bool) and item >= 0:
                result.add(item)
            elif lookup_group and isinstance(item, str):
                result.add(_group_id(item, self._where(key)))
            else:
                raise ConfigError(f"{self._where(key)}: {item!r} is not a valid id")
        return frozenset(result)

    def entries(self) -> list[str]:
        self._seen.update(self._data)
        return list(self._data)

    def given(self, key: str) -> bool:
        return key in self._data

    def retired(self, key: str, why: str) -> None:
        """A key an older version read: refused with the reason, so the
        operator deletes it knowingly."""
        self._seen.add(key)
        if key in self._data:
            raise ConfigError(f"{self._where(key)} is no longer a setting ({why}); delete it")

    def check_unknown(self) -> None:
        unknown = sorted(set(self._data) - self._seen)
        if unknown:
            raise ConfigError(f"unknown key(s) in [{self._path or 'top level'}]: {', '.join(unknown)}")


def _group_id(name: str, where: str) -> int:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise ConfigError(f"{where}: no group named {name!r} on this system") from None


def _access_rule(table: _Table) -> AccessRule:
    rule = AccessRule(table.ids("uids"), table.ids("gids", lookup_group=True))
    table.check_unknown()
    return rule


def _quota(table: _Table, default: Quota) -> Quota:
    quota = Quota(table.size("max_bytes", default.max_bytes), int(table.number("max_buffers", default.max_buffers)))
    table.check_unknown()
    return quota


def _mode(table: _Table, key: str, default: str) -> int:
    text = table.string(key, default)
    try:
        return int(text, 8)
    except ValueError:
        raise ConfigError(f'{table._where(key)} must be an octal string like "0660", not {text!r}') from None


def _socket_policy(table: _Table) -> SocketPolicy:
    mode = _mode(table, "mode", "0666")
    group_text = table.string("group", "")
    group: int | None = None
    if group_text:
        group = int(group_text) if group_text.isdigit() else _group_id(group_text, "sockets.group")
    table.check_unknown()
    return SocketPolicy(mode=mode, group=group)


def _client_policy(table: _Table) -> ClientPolicy:
    allowed_uids = table.ids("allowed_uids")
    allowed_gids = table.ids("allowed_gids", lookup_group=True)
    admin_uids = table.ids("admin_uids") | {0}
    admin_gids = table.ids("admin_gids", lookup_group=True)
    table.check_unknown()
    allowed = AccessRule(allowed_uids, allowed_gids) if (allowed_uids or allowed_gids) else None
    return ClientPolicy(allowed=allowed, admins=AccessRule(frozenset(admin_uids), admin_gids))


def _discovery(table: _Table) -> DiscoveryConfig:
    source = table.string("source", "auto")
    if source not in ("auto", "udev", "scan"):
        raise ConfigError(f'discovery.source must be "auto", "udev" or "scan", not {source!r}')
    interval = table.number("rescan_interval_s", 2.0)
    if interval <= 0:
        raise ConfigError("discovery.rescan_interval_s must be positive")
    config = DiscoveryConfig(
        source=source,
        dev_root=Path(table.string("dev_root", "/dev")),
        sys_root=Path(table.string("sys_root", "/sys")),
        rescan_interval_s=interval,
        memfd=table.flag("memfd", True),
    )
    table.check_unknown()
    return config


def _heaps(table: _Table, usage_table: _Table) -> HeapConfig:
    aliases = dict(DEFAULT_ALIASES)
    alias_table = table.table("aliases")
    for name in alias_table.entries():
        aliases[name] = alias_table.names(name, ())
    access_table = table.table("access")
    access = {name: _access_rule(access_table.table(name)) for name in access_table.entries()}
    usage = dict(DEFAULT_USAGE)
    for name in usage_table.entries():
        usage[name] = usage_table.names(name, ())
    json_path, npu_heaps = _dma_heap_json(table)
    config = HeapConfig(
        probe_order=table.names("probe_order", DEFAULT_PROBE_ORDER),
        aliases=aliases,
        usage=usage,
        access=access,
        max_buffer_bytes=table.size("max_buffer_bytes", 0),
        max_batch=int(table.number("max_batch", 1024)),
        dma_heap_json=json_path,
        npu=npu_heaps,
        memfd_reserve=table.sizes("memfd_reserve"),
    )
    table.check_unknown()
    if config.max_batch < 1:
        raise ConfigError("heaps.max_batch must be at least 1")
    _check_reserve(config)
    return config


# A reserve holds its memory while idle: a few sizes, and never most of the
# machine.
MAX_RESERVE_ENTRIES = 16


def physical_memory() -> int:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _check_reserve(config: HeapConfig) -> None:
    sizes = config.memfd_reserve
    page = os.sysconf("SC_PAGE_SIZE")
    if len(sizes) > MAX_RESERVE_ENTRIES:
        raise ConfigError(f"heaps.memfd_reserve names {len(sizes)} sizes; at most {MAX_RESERVE_ENTRIES}")
    for size in sizes:
        if size <= 0 or size % page:
            raise ConfigError(f"heaps.memfd_reserve: {size} is not a positive multiple of the page size ({page})")
        if config.max_buffer_bytes and size > config.max_buffer_bytes:
            raise ConfigError(
                f"heaps.memfd_reserve: {size} bytes is more than heaps.max_buffer_bytes ({config.max_buffer_bytes})"
            )
    physical = physical_memory()
    if sum(sizes) > physical // 2:
        raise ConfigError(
            f"heaps.memfd_reserve adds up to {sum(sizes)} bytes, more than half of this machine's memory ({physical})"
        )


def _dma_heap_json(table: _Table) -> tuple[Path | None, DmaHeapsInfo | None]:
    """Read heaps.dma_heap_json. Android's own path may be missing (devices
    without an NPU have none), so by default a missing file turns the
    routes off; a path the config names must exist, or a typo would drop
    the routes without a word. "" turns them off."""
    given = table.given("dma_heap_json")
    text = table.string("dma_heap_json", str(dma_heap_json.DEFAULT_PATH))
    if not text:
        return None, None
    path = Path(text)
    if not path.is_absolute():
        raise ConfigError(f"heaps.dma_heap_json: {text!r} is not an absolute path")
    try:
        info = dma_heap_json.load(path)
    except FileNotFoundError:
        if given:
            raise ConfigError(
                f'heaps.dma_heap_json: {path} does not exist (set "" to route without a dma_heap.json)'
            ) from None
        return None, None
    except DmaHeapJsonError as error:
        raise ConfigError(f"heaps.dma_heap_json: {error}") from None
    for warning in info.warnings:
        log.warning("%s: %s", path, warning)
    for (kind, device), heaps in info.routes().items():
        if kind != npu.UNSPECIFIED and len(heaps) > 1:
            log.warning(
                "%s: %s for NPU %d is listed for several heaps (%s); Android's NPU manager takes any one of "
                "them, dmabufd tries them in the file's order",
                path,
                npu.android_name(kind),
                device,
                ", ".join(heaps),
            )
    log.info("NPU buffer types route by %s (%d heap(s))", path, len(info.devices))
    return path, info


def _loading(table: _Table) -> LoadingConfig:
    defaults = LoadingConfig()
    roots = tuple(Path(root) for root in table.names("roots", ()))
    for root in roots:
        if not root.is_absolute():
            raise ConfigError(f"loading.roots: {str(root)!r} is not an absolute path")
    parallelism = int(table.number("parallelism", defaults.parallelism))
    chunk_bytes = table.size("chunk_bytes", defaults.chunk_bytes)
    kinds: dict[str, LoadProfile] = {}
    for kind in LOAD_KINDS:
        sub = table.table(kind)
        profile = LoadProfile(int(sub.number("parallelism", parallelism)), sub.size("chunk_bytes", chunk_bytes))
        sub.check_unknown()
        _check_profile(f"loading.{kind}", profile)
        kinds[kind] = profile
    table.retired(
        "populate",
        "memfd buffers are filled by writing to them, which allocates their pages without faults, "
        "so there is nothing to populate ahead of the reads",
    )
    table.retired("huge_pages", "it applied to the populate lane, which is gone")
    config = LoadingConfig(
        roots=roots,
        parallelism=parallelism,
        chunk_bytes=chunk_bytes,
        kinds=kinds,
        page_cache=table.flag("page_cache", defaults.page_cache),
        model_budget_bytes=table.size("model_budget_bytes", defaults.model_budget_bytes),
        pool_recycle_budget_bytes=table.size("pool_recycle_budget_bytes", defaults.pool_recycle_budget_bytes),
        max_header_bytes=table.size("max_header_bytes", defaults.max_header_bytes),
        max_tensors=int(table.number("max_tensors", defaults.max_tensors)),
    )
    table.check_unknown()
    if config.max_header_bytes < 8 or config.max_tensors < 1:
        raise ConfigError("loading.max_header_bytes and loading.max_tensors must be positive")
    _check_profile("loading", LoadProfile(config.parallelism, config.chunk_bytes))
    return config


def _check_profile(where: str, profile: LoadProfile) -> None:
    if not 1 <= profile.parallelism <= 64:
        raise ConfigError(f"{where}.parallelism must be between 1 and 64")
    if profile.chunk_bytes < 4096 or profile.chunk_bytes % 4096:
        raise ConfigError(f"{where}.chunk_bytes must be a positive multiple of 4 KiB")


def _limits(table: _Table) -> LimitsConfig:
    defaults = LimitsConfig()
    counts = {
        name: int(table.number(name, getattr(defaults, name)))
        for name in (
            "sessions_per_uid",
            "calls_per_uid",
            "watches_per_uid",
            "loads_per_uid",
            "threads_per_uid",
            "outbox_frames",
            "grant_buffers",
        )
    }
    stall = table.number("outbox_stall_s", defaults.outbox_stall_s)
    table.check_unknown()
    for name, value in counts.items():
        if value < 1:
            raise ConfigError(f"limits.{name} must be at least 1")
    if stall <= 0:
        raise ConfigError("limits.outbox_stall_s must be positive")
    return LimitsConfig(outbox_stall_s=stall, **counts)


def _loopback_address(text: str, where: str) -> tuple[str, int]:
    """`host:port` (`[::1]:port` for IPv6) with a loopback IP literal:
    metrics say who uses how much memory, so they never leave the machine."""
    host, sep, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not sep or not loopback:
        raise ConfigError(
            f'{where} must be a loopback address and port like "127.0.0.1:9464" or "[::1]:9464", not {text!r} '
            "(metrics are served on loopback or a Unix socket only)"
        )
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"{where}: {port_text!r} is not a port number (1 to 65535)")
    return host, int(port_text)


def _metrics(table: _Table) -> MetricsConfig:
    listen_text = table.string("listen", "")
    unix_text = table.string("unix", "")
    mode = _mode(table, "unix_mode", "0600")
    table.check_unknown()
    if listen_text and unix_text:
        raise ConfigError("metrics.listen and metrics.unix are exclusive: serve metrics on one of them")
    listen = _loopback_address(listen_text, "metrics.listen") if listen_text else None
    return MetricsConfig(listen=listen, unix=Path(unix_text) if unix_text else None, unix_mode=mode)


def _scheduling(table: _Table) -> SchedulingConfig:
    text = table.string("call_cpus", "")
    nice = float(table.number("loop_nice", SchedulingConfig.loop_nice))
    table.check_unknown()
    if not nice.is_integer() or not -20 <= nice <= 19:  # is_integer: not inf, not nan
        raise ConfigError(f"scheduling.loop_nice must be a whole number from -20 to 19, not {nice:g}")
    loop_nice = int(nice)
    if not text:
        return SchedulingConfig(loop_nice=loop_nice)
    try:
        cpus = parse_cpus(text)
    except ValueError as error:
        raise ConfigError(f"scheduling.call_cpus: {error}") from None
    # Checked here, where a mistake stops start-up with the config's name
    # on it, rather than when the loop pins itself.
    usable = os.sched_getaffinity(0)
    if not cpus <= usable:
        raise ConfigError(
            f"scheduling.call_cpus names CPU(s) {format_cpus(cpus - usable)}, which dmabufd may not run on "
            f"(it may use {format_cpus(usable)})"
        )
    return SchedulingConfig(call_cpus=cpus, loop_nice=loop_nice)


def parse_config(data: dict[str, Any]) -> Config:
    top = _Table(data, "")
    default_quota = Config().default_quota
    quota_table = top.table("quota")
    default_quota = _quota(quota_table.table("default"), default_quota)
    uid_table = quota_table.table("uids")
    uid_quotas: dict[int, Quota] = {}
    for key in uid_table.entries():
        if not key.isdigit():
            raise ConfigError(f"quota.uids keys are numeric uids, not {key!r}")
        uid_quotas[int(key)] = _quota(uid_table.table(key), default_quota)
    quota_table.check_unknown()
    config = Config(
        sockets=_socket_policy(top.table("sockets")),
        clients=_client_policy(top.table("clients")),
        discovery=_discovery(top.table("discovery")),
        heaps=_heaps(top.table("heaps"), top.table("usage")),
        loading=_loading(top.table("loading")),
        limits=_limits(top.table("limits")),
        metrics=_metrics(top.table("metrics")),
        scheduling=_scheduling(top.table("scheduling")),
        default_quota=default_quota,
        uid_quotas=uid_quotas,
    )
    top.check_unknown()
    if config.heaps.memfd_reserve and not config.discovery.memfd:
        raise ConfigError(
            "heaps.memfd_reserve prepares memfds for the memfd heap, which discovery.memfd = false turns off"
        )
    # The largest delivery (one call's batch, in frames of 253 fds) must fit
    # an outbox with room to spare, or a legal call would end its session.
    frames = -(-config.heaps.max_batch // MAX_FDS_PER_FRAME)
    if config.limits.outbox_frames < frames + 1:
        raise ConfigError(
            f"limits.outbox_frames ({config.limits.outbox_frames}) must be at least {frames + 1} "
            f"for heaps.max_batch = {config.heaps.max_batch} ({frames} frames of {MAX_FDS_PER_FRAME} fds, plus one)"
        )
    return config


def load_config(path: Path | None) -> Config:
    """Read a TOML config file; None gives the built-in defaults (which
    read Android's dma_heap.json where it exists)."""
    if path is None:
        return parse_config({})
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except OSError as error:
        raise ConfigError(f"cannot read config {path}: {os.strerror(error.errno or 0)}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"config {path} is not valid TOML: {error}") from None
    return parse_config(data)
