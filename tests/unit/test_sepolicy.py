"""The SELinux sketch (android/sepolicy/): it names only the kernel's classes
and permissions (Linux 6.12's classmap.h, from the Debian kernel source),
declares and labels every type it uses, compiles with checkpolicy, labels
what the .rc names, and the checks catch what the vendor review found in
the first sketch (tests/unit/data/sepolicy_v1/).

The Debian packages linux-source-6.12 and checkpolicy are installed when
missing if the tests run as root (CI); otherwise the tests fail saying
what to install."""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import pytest

from dmabufd_common.paths import ANDROID_SOCKET_DIR, CONTROL_ACTIVATION_NAME, FD_ACTIVATION_NAME
from tools import sepolicy_check as sc

REPO = Path(__file__).resolve().parents[2]
SKETCH = REPO / "android/sepolicy"
OLD_SKETCH = Path(__file__).resolve().parent / "data/sepolicy_v1"
RC = REPO / "android/dmabufd.rc"

# Every file the daemon uses on a device, and the type it must have.
EXPECTED_LABELS = {
    ("/vendor/bin/dmabufd", "--"): "dmabufd_exec",
    ("/vendor/etc/dmabufd.toml", "--"): "vendor_configs_file",
    ("/vendor/etc/dma_heap.json", "--"): "vendor_configs_file",
    ("/dev/socket/dmabufd", "-s"): "dmabufd_socket",
    ("/dev/socket/dmabufd_fd", "-s"): "dmabufd_fd_socket",
    ("/dev/udmabuf", "-c"): "udmabuf_device",
    ("/dev/dma_heap/system", "-c"): "dmabuf_system_heap_device",
    ("/dev/dma_heap/system-uncached", "-c"): "dmabuf_system_heap_device",
    ("/dev/dma_heap/linux,cma", "-c"): "dmabuf_cma_heap_device",
    ("/dev/dma_heap/reserved", "-c"): "dmabuf_cma_heap_device",
}


@pytest.fixture(scope="module")
def classmap() -> sc.ClassMap:
    try:
        return sc.load_classmap()
    except sc.ToolMissing as error:
        pytest.fail(f"cannot read {sc.KERNEL_NAME}'s classmap.h: {error}")


@pytest.fixture(scope="module")
def checkpolicy() -> str:
    try:
        return sc.find_checkpolicy()
    except sc.ToolMissing as error:
        pytest.fail(f"cannot compile the sketch: {error}")


@pytest.fixture(scope="module")
def report(classmap: sc.ClassMap) -> sc.Report:
    return sc.check(sc.load_sketch(SKETCH), classmap)


def compile_sketch(sketch: sc.Sketch, classmap: sc.ClassMap, checkpolicy: str, workdir: Path) -> sc.Compiled:
    return sc.compile_policy(sc.policy_conf(sketch, classmap), checkpolicy, workdir)


def file_contexts(report: sc.Report) -> list[sc.FileContext]:
    return [*sc.platform_file_contexts(), *report.file_contexts]


def label_of(path: str, entries: list[sc.FileContext], kind: str = "--") -> str | None:
    entry = sc.lookup(path, entries, kind)
    assert entry is not None, f"nothing labels {path}"
    return entry.type


# -- classmap.h ----------------------------------------------------------------


def test_the_classmap_parser_expands_nested_common_sets() -> None:
    text = """
#define COMMON_FILE_SOCK_PERMS \\
\t"ioctl", "read"
#define COMMON_SOCK_PERMS COMMON_FILE_SOCK_PERMS, "bind" /* a comment */
const struct security_class_mapping secclass_map[] = {
\t{ "fd", { "use", NULL } },
\t{ "unix_stream_socket",
\t  { COMMON_SOCK_PERMS, "connectto", NULL } },
\t{ NULL }
};
"""
    parsed = sc.parse_classmap(text)
    assert parsed.commons == {"sock": ("ioctl", "read", "bind")}
    assert parsed.classes["unix_stream_socket"] == sc.ClassDef(
        "unix_stream_socket", "sock", ("ioctl", "read", "bind"), ("connectto",)
    )
    assert parsed.classes["fd"].permissions == ("use",)
    with pytest.raises(sc.ClassmapError, match="unknown macro COMMON_NOPE_PERMS"):
        sc.parse_classmap(text.replace("COMMON_FILE_SOCK_PERMS, ", "COMMON_NOPE_PERMS, "))


def test_the_kernel_classmap_has_its_classes_and_common_sets(classmap: sc.ClassMap) -> None:
    classes = classmap.classes
    assert "unix_seqpacket_socket" not in classes
    assert "memfd_file" not in classes
    # SOCK_SEQPACKET AF_UNIX sockets: unix_stream_socket, with the socket
    # set (which nests the file/socket set) and connectto.
    stream = classes["unix_stream_socket"]
    assert stream.common == "sock"
    assert {"map", "name_bind", "accept", "listen"} <= set(stream.inherited)
    assert stream.own == ("connectto",)
    assert classes["file"].common == "file"
    assert {"watch_reads", "open", "execmod"} <= set(classes["file"].inherited)
    assert classes["file"].own == ("execute_no_trans", "entrypoint")
    assert "sys_ptrace" in classes["capability"].permissions
    assert "checkpoint_restore" in classes["capability2"].permissions
    assert classes["fd"].permissions == ("use",)
    assert classes["io_uring"].permissions == ("override_creds", "sqpoll", "cmd")
    assert set(classmap.commons) == {"file", "sock", "ipc", "cap", "cap2"}


# -- macros ----------------------------------------------------------------------


def test_macro_expansion_keeps_every_line_where_it_was() -> None:
    text = "# r_file_perms stays in a comment\nunix_socket_connect(a,\n  b, c)\nallow x y:file r_file_perms;\n"
    expanded = sc.expand_macros(text)
    lines = expanded.split("\n")
    assert lines[0] == "# r_file_perms stays in a comment"
    assert lines[1] == "allow a b_socket:sock_file write; allow a c:unix_stream_socket connectto;"
    assert lines[2] == ""
    assert lines[3] == "allow x y:file { getattr open read ioctl lock map watch watch_reads };"
    with pytest.raises(sc.MacroError, match="takes arguments"):
        sc.expand_macros("r_dir_file;")


def test_macro_bodies_hold_no_comments() -> None:
    # An expansion is put on one line, where a comment would swallow the rest.
    assert not [name for name, body in sc.MACROS.items() if "#" in body]


# -- the sketch ------------------------------------------------------------------


def test_the_sketch_names_kernel_classes_and_declared_types_only(report: sc.Report) -> None:
    assert [str(finding) for finding in report.findings] == []
    # The check saw the sketch: its rules, its types, its labels.
    assert any(isinstance(s, sc.Rule) for s in report.parsed.statements)
    assert {entry.type for entry in report.file_contexts} >= {"udmabuf_device", "dmabuf_cma_heap_device"}
    assert [entry.type for entry in report.genfs_contexts] == ["sysfs_udmabuf"]


def test_the_sketch_compiles_with_checkpolicy(classmap: sc.ClassMap, checkpolicy: str, tmp_path: Path) -> None:
    compiled = compile_sketch(sc.load_sketch(SKETCH), classmap, checkpolicy, tmp_path)
    assert compiled.ok, compiled.output
    assert (tmp_path / f"policy.{sc.POLICY_VERSION}").stat().st_size > 0


@pytest.mark.parametrize(("path", "kind"), list(EXPECTED_LABELS))
def test_every_file_the_daemon_uses_has_its_label(report: sc.Report, path: str, kind: str) -> None:
    assert label_of(path, file_contexts(report), kind) == EXPECTED_LABELS[path, kind]


def rc_lines() -> Iterator[list[str]]:
    for line in RC.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            yield shlex.split(line)


def test_the_sketch_labels_what_the_rc_names(report: sc.Report) -> None:
    """The executable, the config and the sockets of android/dmabufd.rc, and
    the socket names the daemon and its clients agree on (paths.py)."""
    entries = file_contexts(report)
    services = [words for words in rc_lines() if words[0] == "service"]
    assert len(services) == 1, services
    executable, *arguments = services[0][2:]
    assert label_of(executable, entries) == "dmabufd_exec"
    config = arguments[arguments.index("--config") + 1]
    assert label_of(config, entries) == "vendor_configs_file"

    sockets = {words[1]: words[2] for words in rc_lines() if words[0] == "socket"}
    assert set(sockets) == {CONTROL_ACTIVATION_NAME, FD_ACTIVATION_NAME}
    assert sockets[FD_ACTIVATION_NAME].split("+")[0] == "seqpacket"
    rules = [s for s in report.parsed.statements if isinstance(s, sc.Rule) and s.kind == "allow"]
    for name in sockets:
        # unix_socket_connect(client, NAME, server) grants write on NAME_socket.
        label = label_of(str(ANDROID_SOCKET_DIR / name), entries, "-s")
        assert label == f"{name}_socket", f"/dev/socket/{name} is labelled {label}"
        assert any(
            rule.source.single() == "hal_dmabufd_client"
            and rule.target.single() == label
            and rule.classes.single() == "sock_file"
            and "write" in rule.permissions.included
            for rule in rules
        ), f"clients cannot connect to /dev/socket/{name}"


def test_clients_are_granted_by_attribute(report: sc.Report) -> None:
    """Rules on the daemon's sockets and fds name hal_dmabufd_client, never a
    client's own domain: a product adds a client with hal_client_domain."""
    daemon_objects = {
        "dmabufd",
        "hal_dmabufd_server",
        "dmabufd_socket",
        "dmabufd_fd_socket",
        "hal_dmabufd_server_tmpfs",
    }
    granted_to = {
        name
        for s in report.parsed.statements
        if isinstance(s, sc.Rule) and s.kind == "allow" and set(s.target.mentioned) & daemon_objects
        for name in s.source.mentioned
    }
    # init: starting the daemon (init_daemon_domain).
    assert granted_to <= {"hal_dmabufd_client", "hal_dmabufd_server", "dmabufd", "init"}


def test_a_platform_app_cannot_be_made_a_client(classmap: sc.ClassMap, checkpolicy: str, tmp_path: Path) -> None:
    """Treble: core domains do not connect to vendor sockets, so the
    neverallow of the AOSP stand-in stops the build."""
    sketch = sc.load_sketch(SKETCH)
    extra = sc.SourceFile("extra.te", "hal_client_domain(untrusted_app, hal_dmabufd)\n")
    widened = sc.Sketch((*sketch.policy, extra), sketch.file_contexts, sketch.genfs_contexts)
    compiled = compile_sketch(widened, classmap, checkpolicy, tmp_path)
    assert not compiled.ok
    assert "neverallow" in compiled.output
    assert "allow untrusted_app dmabufd:unix_stream_socket { connectto }" in compiled.output


# -- the first sketch, as the vendor review found it --------------------------------


def test_the_first_sketch_is_rejected(classmap: sc.ClassMap, checkpolicy: str, tmp_path: Path) -> None:
    old = sc.load_sketch(OLD_SKETCH)
    report = sc.check(old, classmap)
    compiled = compile_sketch(old, classmap, checkpolicy, tmp_path)
    # What a closing note quotes (pytest -s, or -rP, shows it).
    print("\n".join(str(finding) for finding in report.findings))
    print(f"{' '.join(compiled.command[:4])}: {'ok' if compiled.ok else 'FAILED'}\n{compiled.output}")

    messages = [finding.message for finding in report.findings]
    unknown_classes = [m for m in messages if m.startswith("unknown class unix_seqpacket_socket:")]
    assert len(unknown_classes) == 2, messages
    assert "type or attribute udmabuf_device is used but never declared" in messages
    assert any(m.startswith("unknown class memfd_file:") for m in messages), messages
    transition = [f for f in report.findings if f.message.startswith("type_transition names socket_device")]
    assert len(transition) == 1, messages
    assert "/dev/socket/dmabufd, which file_contexts labels dmabufd_socket" in transition[0].message

    assert not compiled.ok
    assert re.search(r"dmabufd\.te:12:ERROR 'unknown type udmabuf_device'", compiled.output), compiled.output
