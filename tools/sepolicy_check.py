#!/usr/bin/env python3
"""Check the SELinux sketch (android/sepolicy/) without an Android tree.

No Android build runs here, so the sketch is checked against what decides
whether it could build and mean something:

1. Names. Every class and permission a rule names must be the kernel's
   (security/selinux/include/classmap.h of Linux 6.12, read from the Debian
   package linux-source-6.12) or one of the Android userspace classes in
   USERSPACE_CLASSES. Every type and attribute a statement names must be
   declared, by the sketch or by PLATFORM_POLICY, a stand-in for the part
   of AOSP's policy the sketch builds on. Every file type the sketch
   declares must be given to some file (file_contexts, genfs_contexts or a
   type_transition), and every domain must have a way in.
2. file_contexts and genfs_contexts: each line's form, regular expression
   and context, whose type must be a declared type (not an attribute).
3. type_transition rules for files: the directory type they name must be
   the label file_contexts gives the directory those files are created in.
4. Compilation: checkpolicy -M (MLS, as Android) builds a policy from the
   classes and permissions generated from classmap.h, a minimal boilerplate
   (initial SIDs, one MLS level, a role and a user), PLATFORM_POLICY and
   the sketch, with the sketch's macros expanded (MACROS). Each
   file_contexts context is compiled too (as an fs_use statement), so
   checkpolicy validates it against the policy.

PLATFORM_POLICY declares AOSP's names with AOSP's attributes and a few of
AOSP's neverallow rules, those that bound what a vendor daemon and its
clients may be granted (Treble's socket separation, CAP_SYS_PTRACE). It is
not AOSP's policy: a sketch that passes here has yet to build in a real
tree, whose domain.te and neverallow rules are many more.

Run as root, the check installs the Debian packages it needs (CI runs on a
fresh machine as root); otherwise it says what to install. classmap.h is
taken from the kernel source tarball once and cached in
${XDG_CACHE_HOME:-~/.cache}/dmabufd-sepolicy.

Usage: sepolicy_check.py [SKETCH_DIR]   (default android/sepolicy)
Exits 1 on any finding or when checkpolicy fails.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SKETCH_DIR = REPO / "android/sepolicy"

KERNEL_PACKAGE = "linux-source-6.12"
KERNEL_NAME = "Linux 6.12"
CLASSMAP_MEMBER = "security/selinux/include/classmap.h"
CHECKPOLICY_PACKAGE = "checkpolicy"
# Android builds its policy at this version (POLICYVERS in system/sepolicy).
POLICY_VERSION = 30
INSTALL_TIMEOUT_S = 1800
RUN_TIMEOUT_S = 300

# Android's userspace object classes (system/sepolicy private/security_classes,
# enforced by servicemanager, init, keystore ...) that the sketch may name.
# None so far: dmabufd serves over sockets, so it is no binder service
# (service_manager, hwservice_manager), sets no property (property_service)
# and holds no keys (keystore2). Add a class here only with the reason the
# sketch needs it, and its permissions as AOSP declares them.
USERSPACE_CLASSES: dict[str, tuple[str, ...]] = {}


class ToolMissing(RuntimeError):
    """A package the check needs is not installed and cannot be installed here."""


# ---------------------------------------------------------------------------
# Debian packages


def _installed(package: str) -> bool:
    if shutil.which("dpkg-query") is None:
        return False
    result = subprocess.run(
        ["dpkg-query", "-W", "-f=${db:Status-Status}", package],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )
    return result.returncode == 0 and result.stdout.strip() == "installed"


def ensure_package(package: str) -> None:
    """Install the Debian package `package` unless it is installed. Raises
    ToolMissing when that needs root and this is not root, or fails."""
    if _installed(package):
        return
    if shutil.which("dpkg-query") is None or shutil.which("apt-get") is None:
        raise ToolMissing(f"the check needs the Debian package {package}, and this system has no dpkg/apt-get")
    if os.geteuid() != 0:
        raise ToolMissing(
            f"the Debian package {package} is not installed, and installing it needs root: "
            f"run `sudo apt-get install {package}`, or run the check as root (as CI does)"
        )
    print(f"sepolicy_check: installing {package} (apt-get)", file=sys.stderr)
    environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", package]

    def run(command: list[str]) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(
                command, capture_output=True, text=True, env=environment, timeout=INSTALL_TIMEOUT_S, check=False
            )
        except subprocess.TimeoutExpired:
            raise ToolMissing(f"`{' '.join(command)}` took over {INSTALL_TIMEOUT_S} s") from None

    result = run(install)
    if result.returncode != 0:
        # A fresh machine may not have fetched its package lists yet.
        run(["apt-get", "update"])
        result = run(install)
    if result.returncode != 0 or not _installed(package):
        tail = " / ".join((result.stderr or result.stdout).strip().splitlines()[-3:])
        raise ToolMissing(f"apt-get could not install {package}: {tail}")


def kernel_tarball() -> Path:
    """The kernel source tarball of KERNEL_PACKAGE (installed if need be)."""
    ensure_package(KERNEL_PACKAGE)
    result = subprocess.run(
        ["dpkg-query", "-L", KERNEL_PACKAGE], capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False
    )
    tarballs = [Path(line) for line in result.stdout.splitlines() if re.fullmatch(r"/usr/src/[^/]+\.tar\.xz", line)]
    if result.returncode != 0 or len(tarballs) != 1 or not tarballs[0].is_file():
        raise ToolMissing(f"{KERNEL_PACKAGE} is installed but lists no single /usr/src/*.tar.xz: {tarballs}")
    return tarballs[0]


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dmabufd-sepolicy"


def extract_classmap(tarball: Path) -> str:
    """classmap.h from the kernel source tarball. Reading it means
    decompressing the tarball up to it (about 10 s), so the result is kept
    in cache_dir(), under a name that changes with the tarball."""
    info = tarball.stat()
    cached = cache_dir() / f"classmap-{tarball.name}-{info.st_size}-{info.st_mtime_ns}.h"
    if cached.is_file():
        return cached.read_text()
    top = tarball.name.removesuffix(".tar.xz")
    member = f"{top}/{CLASSMAP_MEMBER}"
    # --occurrence=1: stop reading the archive once the member is out.
    result = subprocess.run(
        ["tar", "-xOf", str(tarball), "--occurrence=1", member],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )
    if result.returncode != 0 or not result.stdout:
        raise ToolMissing(f"could not read {member} from {tarball}: {result.stderr.strip()}")
    cached.parent.mkdir(parents=True, exist_ok=True)
    partial = cached.with_name(cached.name + f".{os.getpid()}.tmp")
    partial.write_text(result.stdout)
    partial.replace(cached)
    return result.stdout


def find_checkpolicy() -> str:
    ensure_package(CHECKPOLICY_PACKAGE)
    found = shutil.which("checkpolicy") or "/usr/bin/checkpolicy"
    if not Path(found).is_file():
        raise ToolMissing(f"{CHECKPOLICY_PACKAGE} is installed but there is no checkpolicy at {found}")
    return found


# ---------------------------------------------------------------------------
# classmap.h


class ClassmapError(ValueError):
    """classmap.h is not in the form this parser knows."""


@dataclass(frozen=True)
class ClassDef:
    name: str
    common: str | None  # the common permission set it starts with, if any
    inherited: tuple[str, ...]  # that set's permissions
    own: tuple[str, ...]

    @property
    def permissions(self) -> tuple[str, ...]:
        return self.inherited + self.own


@dataclass(frozen=True)
class ClassMap:
    commons: dict[str, tuple[str, ...]]
    classes: dict[str, ClassDef]


def _common_name(macro: str) -> str:
    """COMMON_FILE_PERMS -> file, COMMON_CAP2_PERMS -> cap2."""
    match = re.fullmatch(r"COMMON_(\w+)_PERMS", macro)
    if match is None:
        raise ClassmapError(f"a class starts with {macro}, which is not a COMMON_*_PERMS set")
    return match.group(1).lower()


def parse_classmap(text: str) -> ClassMap:
    """Classes and permissions of secclass_map[] in classmap.h, with the
    COMMON_*_PERMS macros (which nest) expanded. A class whose list starts
    with such a macro inherits it as a common, as kernel policies declare."""
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.DOTALL)
    text = re.sub(r"//[^\n]*", " ", text)
    text = text.replace("\\\n", " ")
    macros: dict[str, list[str]] = {}
    for match in re.finditer(r"^[ \t]*#[ \t]*define[ \t]+(\w+)[ \t]+(.+)$", text, flags=re.MULTILINE):
        macros[match.group(1)] = [item.strip() for item in match.group(2).split(",") if item.strip()]

    def expand(items: Sequence[str], seen: tuple[str, ...] = ()) -> list[str]:
        names: list[str] = []
        for item in items:
            if item.startswith('"'):
                if not re.fullmatch(r'"[a-z0-9_]+"', item):
                    raise ClassmapError(f"unexpected permission {item}")
                names.append(item.strip('"'))
            elif item in macros and item not in seen:
                names += expand(macros[item], (*seen, item))
            else:
                raise ClassmapError(f"unknown macro {item} in a permission list")
        return names

    start = text.find("secclass_map[]")
    end = text.find("};", start)
    if start < 0 or end < 0:
        raise ClassmapError("no secclass_map[] = { ... }; in classmap.h")
    table = text[start:end]
    entries = re.findall(r'\{\s*"([a-z0-9_]+)"\s*,\s*\{([^{}]*)\}\s*\}', table)
    if not entries or len(entries) != len(re.findall(r'"\s*,\s*\{', table)):
        raise ClassmapError("secclass_map[] has entries this parser cannot read")
    commons: dict[str, tuple[str, ...]] = {}
    classes: dict[str, ClassDef] = {}
    for name, body in entries:
        items = [item.strip() for item in body.split(",") if item.strip()]
        if not items or items[-1] != "NULL":
            raise ClassmapError(f"class {name}: its permission list does not end with NULL")
        items = items[:-1]
        common: str | None = None
        inherited: tuple[str, ...] = ()
        if items and not items[0].startswith('"'):
            common = _common_name(items[0])
            inherited = tuple(expand(items[:1]))
            commons[common] = inherited
            items = items[1:]
        own = tuple(expand(items))
        if name in classes:
            raise ClassmapError(f"class {name} is listed twice")
        if len(inherited) + len(own) > 32:
            raise ClassmapError(f"class {name} has more than 32 permissions")
        classes[name] = ClassDef(name, common, inherited, own)
    return ClassMap(commons, classes)


def load_classmap() -> ClassMap:
    """The classes of KERNEL_PACKAGE's classmap.h. Raises ToolMissing."""
    return parse_classmap(extract_classmap(kernel_tarball()))


# ---------------------------------------------------------------------------
# Macros: the few of AOSP's (global_macros, te_macros) the sketch uses,
# written here with the same meaning. $1, $2 ... are the arguments. Bodies
# hold no comments: an expansion is put on one line.

MACROS: dict[str, str] = {
    # Permission sets.
    "r_file_perms": "{ getattr open read ioctl lock map watch watch_reads }",
    "w_file_perms": "{ open append write lock map }",
    "rw_file_perms": "{ r_file_perms w_file_perms }",
    "create_file_perms": "{ create rename setattr unlink rw_file_perms }",
    "r_dir_perms": "{ open getattr read search ioctl lock watch watch_reads }",
    "w_dir_perms": "{ open search write add_name remove_name lock }",
    "rw_dir_perms": "{ r_dir_perms w_dir_perms }",
    "rw_socket_perms_no_ioctl": "{ read getattr write setattr lock append bind connect getopt setopt shutdown map }",
    "rw_socket_perms": "{ ioctl rw_socket_perms_no_ioctl }",
    "create_socket_perms_no_ioctl": "{ create rw_socket_perms_no_ioctl }",
    "create_socket_perms": "{ create rw_socket_perms }",
    "rw_stream_socket_perms": "{ rw_socket_perms listen accept }",
    "create_stream_socket_perms": "{ create rw_stream_socket_perms }",
    # Class sets.
    "global_capability_class_set": "{ capability cap_userns }",
    # Domains and HALs.
    "domain_trans": (
        "allow $1 $2:file { getattr open read execute map }; "
        "allow $1 $3:process transition; "
        "allow $3 $2:file { entrypoint open read execute getattr map }; "
        "dontaudit $1 $3:process noatsecure; "
        "allow $1 $3:process { siginh rlimitinh };"
    ),
    "domain_auto_trans": "domain_trans($1, $2, $3) type_transition $1 $2:process $3;",
    "init_daemon_domain": "domain_auto_trans(init, $1_exec, $1)",
    "hal_attribute": (
        "attribute hal_$1; expandattribute hal_$1 true; "
        "attribute hal_$1_client; expandattribute hal_$1_client true; "
        "attribute hal_$1_server; expandattribute hal_$1_server false; "
        "neverallow { hal_$1_server -halserverdomain } domain:process fork;"
    ),
    "hal_server_domain": "typeattribute $1 halserverdomain; typeattribute $1 $2_server; typeattribute $1 $2;",
    "hal_client_domain": "typeattribute $1 halclientdomain; typeattribute $1 $2_client;",
    # Access.
    "unix_socket_connect": "allow $1 $2_socket:sock_file write; allow $1 $3:unix_stream_socket connectto;",
    "r_dir_file": "allow $1 $2:dir r_dir_perms; allow $1 $2:{ file lnk_file } r_file_perms;",
}
_MAX_DEPTH = 16
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ARGUMENT = re.compile(r"\$([1-9])")


class MacroError(ValueError):
    def __init__(self, offset: int, message: str) -> None:
        super().__init__(message)
        self.offset = offset


def _call_arguments(text: str, start: int, name: str) -> tuple[list[str], int]:
    """The arguments of a call whose "(" is at `start`, and the offset
    after its ")"."""
    depth = 0
    arguments: list[str] = []
    begin = start + 1
    for index in range(start, len(text)):
        char = text[index]
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                arguments.append(text[begin:index].strip())
                return arguments, index + 1
        elif char == "," and depth == 1:
            arguments.append(text[begin:index].strip())
            begin = index + 1
    raise MacroError(start, f"{name}(: no closing parenthesis")


def _substitute(body: str, arguments: Sequence[str]) -> str:
    """`body` with $N replaced by the Nth argument (empty when not given, as m4 does)."""

    def argument(match: re.Match[str]) -> str:
        number = int(match.group(1))
        return arguments[number - 1] if number <= len(arguments) else ""

    return _ARGUMENT.sub(argument, body)


def _expand(text: str, macros: Mapping[str, str], depth: int) -> str:
    if depth > _MAX_DEPTH:
        raise MacroError(0, "macros nest too deep (one calls itself?)")
    out: list[str] = []
    index = 0
    while index < len(text):
        char = text[index]
        if char == "#":
            end = text.find("\n", index)
            end = len(text) if end < 0 else end
            out.append(text[index:end])
            index = end
            continue
        if char == '"':
            end = text.find('"', index + 1)
            end = len(text) if end < 0 else end + 1
            out.append(text[index:end])
            index = end
            continue
        if char == "`":
            raise MacroError(index, "m4 quoting (`...') is not supported here")
        match = _IDENTIFIER.match(text, index) if char.isalpha() or char == "_" else None
        if match is None:
            out.append(char)
            index += 1
            continue
        name, after = match.group(), match.end()
        body = macros.get(name)
        if body is None:
            out.append(name)
            index = after
            continue
        takes_arguments = _ARGUMENT.search(body) is not None
        if takes_arguments and not text.startswith("(", after):
            raise MacroError(index, f"{name} takes arguments: {name}(...)")
        arguments: list[str] = []
        end = after
        if takes_arguments:
            arguments, end = _call_arguments(text, after, name)
        substituted = _substitute(body, arguments)
        try:
            expansion = _expand(substituted, macros, depth + 1)
        except MacroError as error:
            raise MacroError(index, f"in {name}(...): {error}") from None
        # The whole expansion on one line, then as many line breaks as the
        # call spanned: every line after it keeps its number.
        out.append(expansion.replace("\n", " ") + "\n" * text.count("\n", index, end))
        index = end
    return "".join(out)


def expand_macros(text: str, macros: Mapping[str, str] = MACROS) -> str:
    """`text` with every macro call expanded, line numbers kept. Raises
    MacroError (its offset is into `text`)."""
    return _expand(text, macros, 0)


# ---------------------------------------------------------------------------
# Policy statements


@dataclass(frozen=True)
class SourceFile:
    name: str  # as messages show it: relative to the repository when inside it
    text: str


@dataclass(frozen=True)
class Where:
    source: str
    line: int

    def __str__(self) -> str:
        return f"{self.source}:{self.line}"


@dataclass(frozen=True)
class Finding:
    where: Where
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass(frozen=True)
class Names:
    """A set of names as policy statements write them: a name, *, or
    { a b -c }, possibly complemented with ~."""

    included: tuple[str, ...] = ()
    excluded: tuple[str, ...] = ()
    star: bool = False
    complement: bool = False

    @property
    def mentioned(self) -> tuple[str, ...]:
        return self.included + self.excluded

    def single(self) -> str | None:
        if len(self.included) == 1 and not (self.excluded or self.star or self.complement):
            return self.included[0]
        return None


@dataclass(frozen=True)
class TypeDecl:
    name: str
    attributes: tuple[str, ...]
    where: Where


@dataclass(frozen=True)
class AttributeDecl:
    name: str
    where: Where


@dataclass(frozen=True)
class TypeAttribute:
    type: str
    attributes: tuple[str, ...]
    where: Where


@dataclass(frozen=True)
class ExpandAttribute:
    names: Names
    where: Where


@dataclass(frozen=True)
class Rule:
    kind: str  # allow, neverallow, dontaudit, auditallow
    source: Names
    target: Names
    classes: Names
    permissions: Names
    where: Where


@dataclass(frozen=True)
class Transition:
    source: Names
    target: Names
    classes: Names
    result: str
    where: Where


Statement = TypeDecl | AttributeDecl | TypeAttribute | ExpandAttribute | Rule | Transition
RULE_KINDS = ("allow", "neverallow", "dontaudit", "auditallow")

_LEXEME = re.compile(
    r"(?P<space>[ \t\r\f\v]+)|(?P<newline>\n)|(?P<comment>#[^\n]*)|(?P<string>\"[^\"\n]*\")"
    r"|(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<punct>[{}();:,~*\-])"
)


@dataclass(frozen=True)
class Token:
    text: str
    line: int


class ParseError(ValueError):
    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line


def _tokens(text: str) -> Iterator[Token]:
    line = 1
    index = 0
    while index < len(text):
        match = _LEXEME.match(text, index)
        if match is None:
            raise ParseError(line, f"unexpected character {text[index]!r}")
        kind = match.lastgroup
        if kind == "newline":
            line += 1
        elif kind in ("name", "punct", "string"):
            yield Token(match.group(), line)
        index = match.end()


class _Reader:
    def __init__(self, words: Sequence[Token]) -> None:
        self.words = words
        self.index = 0

    def peek(self) -> str | None:
        return self.words[self.index].text if self.index < len(self.words) else None

    def take(self) -> Token:
        if self.index >= len(self.words):
            line = self.words[-1].line if self.words else 0
            raise ParseError(line, "the statement ends too early")
        token = self.words[self.index]
        self.index += 1
        return token

    def name(self) -> str:
        token = self.take()
        if not _IDENTIFIER.fullmatch(token.text):
            raise ParseError(token.line, f"expected a name, found {token.text!r}")
        return token.text

    def expect(self, text: str) -> None:
        token = self.take()
        if token.text != text:
            raise ParseError(token.line, f"expected {text!r}, found {token.text!r}")

    def names(self) -> Names:
        complement = False
        if self.peek() == "~":
            self.take()
            complement = True
        if self.peek() == "*":
            self.take()
            return Names(star=True, complement=complement)
        if self.peek() != "{":
            return Names((self.name(),), complement=complement)
        self.take()
        included: list[str] = []
        excluded: list[str] = []
        star = False
        depth = 1
        while depth:
            word = self.peek()
            if word == "{":
                depth += 1
                self.take()
            elif word == "}":
                depth -= 1
                self.take()
            elif word == "*":
                star = True
                self.take()
            elif word == "-":
                self.take()
                excluded.append(self.name())
            else:
                included.append(self.name())
        return Names(tuple(included), tuple(excluded), star, complement)

    def comma_names(self) -> tuple[str, ...]:
        names = [self.name()]
        while self.peek() == ",":
            self.take()
            names.append(self.name())
        return tuple(names)

    def end(self) -> None:
        if self.index != len(self.words):
            token = self.words[self.index]
            raise ParseError(token.line, f"unexpected {token.text!r}")


def _statement(words: Sequence[Token], source: str) -> Statement:
    reader = _Reader(words)
    keyword = reader.name()
    where = Where(source, words[0].line)
    statement: Statement
    if keyword == "type":
        name = reader.name()
        attributes: tuple[str, ...] = ()
        if reader.peek() == ",":
            reader.take()
            attributes = reader.comma_names()
        statement = TypeDecl(name, attributes, where)
    elif keyword == "attribute":
        statement = AttributeDecl(reader.name(), where)
    elif keyword == "expandattribute":
        names = reader.names()
        if reader.name() not in ("true", "false"):
            raise ParseError(where.line, "expandattribute takes true or false")
        statement = ExpandAttribute(names, where)
    elif keyword == "typeattribute":
        statement = TypeAttribute(reader.name(), reader.comma_names(), where)
    elif keyword in RULE_KINDS:
        source_names = reader.names()
        target = reader.names()
        reader.expect(":")
        statement = Rule(keyword, source_names, target, reader.names(), reader.names(), where)
    elif keyword == "type_transition":
        source_names = reader.names()
        target = reader.names()
        reader.expect(":")
        classes = reader.names()
        result = reader.name()
        if reader.peek() is not None and reader.peek() != ";":
            token = reader.take()  # the object name of a named transition
            if not token.text.startswith('"'):
                raise ParseError(token.line, f"expected an object name in quotes, found {token.text!r}")
        statement = Transition(source_names, target, classes, result, where)
    else:
        raise ParseError(where.line, f"{keyword!r} statements are not understood by this checker")
    reader.end()
    return statement


@dataclass
class Parsed:
    statements: list[Statement] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    # Each file's text with the macros expanded, for checkpolicy.
    expanded: list[tuple[str, str]] = field(default_factory=list)


def parse_policy(files: Iterable[SourceFile]) -> Parsed:
    parsed = Parsed()
    for source in files:
        try:
            text = expand_macros(source.text)
        except MacroError as error:
            line = source.text.count("\n", 0, error.offset) + 1
            parsed.findings.append(Finding(Where(source.name, line), str(error)))
            text = source.text
        parsed.expanded.append((source.name, text))
        try:
            words: list[Token] = []
            for token in _tokens(text):
                if token.text != ";":
                    words.append(token)
                    continue
                if words:
                    try:
                        parsed.statements.append(_statement(words, source.name))
                    except ParseError as error:
                        parsed.findings.append(Finding(Where(source.name, error.line), str(error)))
                words = []
            if words:
                parsed.findings.append(Finding(Where(source.name, words[0].line), "statement without a closing ';'"))
        except ParseError as error:
            parsed.findings.append(Finding(Where(source.name, error.line), str(error)))
    return parsed


# ---------------------------------------------------------------------------
# file_contexts and genfs_contexts

FILE_KINDS = ("--", "-d", "-c", "-b", "-s", "-l", "-p")
_CONTEXT = re.compile(r"u:object_r:([A-Za-z_][A-Za-z0-9_]*):s0")
# What libselinux takes for a regular expression (label_file.h): an entry
# without any of these is an exact path, and beats every regex.
_META = set(".^$?*+|[({")


@dataclass(frozen=True)
class FileContext:
    regex: str
    kind: str | None  # one of FILE_KINDS, or None for any
    type: str | None  # None for <<none>>
    context: str
    where: Where


def _has_meta(regex: str) -> bool:
    index = 0
    while index < len(regex):
        if regex[index] == "\\":
            index += 2
            continue
        if regex[index] in _META:
            return True
        index += 1
    return False


def parse_file_contexts(source: SourceFile) -> tuple[list[FileContext], list[Finding]]:
    entries: list[FileContext] = []
    findings: list[Finding] = []
    seen: dict[tuple[str, str | None], Where] = {}
    for number, raw in enumerate(source.text.splitlines(), start=1):
        where = Where(source.name, number)
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) == 3 and fields[1] in FILE_KINDS:
            regex, kind, context = fields
        elif len(fields) == 2:
            (regex, context), kind = fields, None
        else:
            findings.append(Finding(where, f"expected `path-regex [{'|'.join(FILE_KINDS)}] context`, found {line!r}"))
            continue
        if not regex.startswith("/"):
            findings.append(Finding(where, f"{regex}: a path regex starts with /"))
        try:
            re.compile(regex)
        except re.error as error:
            findings.append(Finding(where, f"{regex}: not a regular expression ({error})"))
            continue
        type_name: str | None = None
        if context != "<<none>>":
            match = _CONTEXT.fullmatch(context)
            if match is None:
                findings.append(Finding(where, f"{context}: Android contexts are u:object_r:<type>:s0"))
                continue
            type_name = match.group(1)
        key = (regex, kind)
        if key in seen:
            findings.append(Finding(where, f"{regex} is already labelled at {seen[key]}"))
            continue
        seen[key] = where
        entries.append(FileContext(regex, kind, type_name, context, where))
    return entries, findings


@dataclass(frozen=True)
class GenfsContext:
    filesystem: str
    path: str
    type: str
    context: str
    where: Where


def parse_genfs_contexts(source: SourceFile) -> tuple[list[GenfsContext], list[Finding]]:
    entries: list[GenfsContext] = []
    findings: list[Finding] = []
    for number, raw in enumerate(source.text.splitlines(), start=1):
        where = Where(source.name, number)
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        match = _CONTEXT.fullmatch(fields[-1]) if len(fields) == 4 else None
        if fields[0] != "genfscon" or match is None or not fields[2].startswith("/"):
            findings.append(Finding(where, f"expected `genfscon <fs> /<path> u:object_r:<type>:s0`, found {line!r}"))
            continue
        entries.append(GenfsContext(fields[1], fields[2], match.group(1), fields[3], where))
    return entries, findings


def lookup(path: str, entries: Sequence[FileContext], kind: str = "--") -> FileContext | None:
    """The entry that labels `path` (a file of `kind`), the way libselinux
    picks it: exact paths after regexes, and the last match wins."""
    ordered = [e for e in entries if _has_meta(e.regex)] + [e for e in entries if not _has_meta(e.regex)]
    for entry in reversed(ordered):
        if entry.kind is not None and entry.kind != kind:
            continue
        if re.fullmatch(entry.regex, path):
            return entry
    return None


# ---------------------------------------------------------------------------
# The platform stand-in


PLATFORM_SOURCE = "(AOSP stand-in)"

PLATFORM_POLICY = """\
attribute domain;
attribute coredomain;
attribute appdomain;
attribute halserverdomain;
attribute halclientdomain;
attribute mlstrustedsubject;
attribute mlstrustedobject;
attribute file_type;
attribute dev_type;
attribute fs_type;
attribute exec_type;
attribute vendor_file_type;
attribute sysfs_type;
attribute proc_type;
attribute dmabuf_heap_device_type;
hal_attribute(camera);

type kernel, domain, mlstrustedsubject;
type init, domain, coredomain, mlstrustedsubject;
type ueventd, domain, coredomain;
type untrusted_app, domain, coredomain, appdomain;
type hal_camera_default, domain;
hal_server_domain(hal_camera_default, hal_camera)

type unlabeled, file_type;
type device, dev_type, fs_type;
type socket_device, dev_type;
type kmsg_debug_device, dev_type;
type dmabuf_heap_device, dmabuf_heap_device_type, dev_type, mlstrustedobject;
type dmabuf_system_heap_device, dmabuf_heap_device_type, dev_type, mlstrustedobject;
type dmabuf_system_secure_heap_device, dmabuf_heap_device_type, dev_type, mlstrustedobject;
type tmpfs, fs_type;
type proc, fs_type, proc_type;
type sysfs, fs_type, sysfs_type, mlstrustedobject;
type sysfs_dma_heap, fs_type, sysfs_type;
type vendor_file, vendor_file_type, file_type;
type vendor_configs_file, vendor_file_type, file_type;

# Treble: no core (platform) domain opens a connection to a socket of a
# vendor domain (AOSP: neverallow_establish_socket_comms in domain.te).
neverallow { coredomain -init } { domain -coredomain }:unix_stream_socket connectto;
neverallow { coredomain -init } { domain -coredomain }:unix_dgram_socket sendto;
# CAP_SYS_PTRACE (needed to read another uid's /proc/<pid>/fd, maps ...)
# goes to a short list of platform domains only (AOSP: private/domain.te).
neverallow { domain -coredomain } self:global_capability_class_set sys_ptrace;
"""

PLATFORM_FILE_CONTEXTS = """\
/dev(/.*)?                               u:object_r:device:s0
/dev/socket(/.*)?                        u:object_r:socket_device:s0
/dev/kmsg_debug                          u:object_r:kmsg_debug_device:s0
/dev/dma_heap(/.*)?                      u:object_r:dmabuf_heap_device:s0
/dev/dma_heap/system                     u:object_r:dmabuf_system_heap_device:s0
/dev/dma_heap/system-uncached            u:object_r:dmabuf_system_heap_device:s0
/dev/dma_heap/system-secure(.*)          u:object_r:dmabuf_system_secure_heap_device:s0
/(vendor|system/vendor)(/.*)?            u:object_r:vendor_file:s0
/(vendor|system/vendor)/etc(/.*)?        u:object_r:vendor_configs_file:s0
"""

PLATFORM_GENFS_CONTEXTS = """\
genfscon proc / u:object_r:proc:s0
genfscon sysfs / u:object_r:sysfs:s0
genfscon sysfs /kernel/dma_heap u:object_r:sysfs_dma_heap:s0
"""

# Attributes that make a type a kind of file, which something must label.
FILE_ATTRIBUTES = frozenset({"file_type", "dev_type", "fs_type", "exec_type", "vendor_file_type", "sysfs_type"})
FILE_CLASSES = frozenset({"file", "dir", "lnk_file", "chr_file", "blk_file", "sock_file", "fifo_file"})


# ---------------------------------------------------------------------------
# The sketch


@dataclass(frozen=True)
class Sketch:
    policy: tuple[SourceFile, ...]  # attributes, then the .te files
    file_contexts: SourceFile | None
    genfs_contexts: SourceFile | None


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def load_sketch(directory: Path) -> Sketch:
    """The policy files of a vendor sepolicy directory, in the order an
    Android build concatenates them: attributes first, then *.te."""

    def read(path: Path) -> SourceFile:
        return SourceFile(_display(path), path.read_text())

    policy = [directory / "attributes"] if (directory / "attributes").is_file() else []
    policy += sorted(directory.glob("*.te"))
    if not policy:
        raise FileNotFoundError(f"{directory} has no attributes file and no .te file")
    file_contexts = directory / "file_contexts"
    genfs_contexts = directory / "genfs_contexts"
    return Sketch(
        tuple(read(path) for path in policy),
        read(file_contexts) if file_contexts.is_file() else None,
        read(genfs_contexts) if genfs_contexts.is_file() else None,
    )


def platform_file_contexts() -> list[FileContext]:
    entries, findings = parse_file_contexts(SourceFile(PLATFORM_SOURCE, PLATFORM_FILE_CONTEXTS))
    assert not findings, findings
    return entries


# ---------------------------------------------------------------------------
# The checks


@dataclass
class _Declared:
    types: dict[str, Where] = field(default_factory=dict)
    attributes: dict[str, Where] = field(default_factory=dict)
    type_attributes: dict[str, set[str]] = field(default_factory=dict)

    def known(self, name: str) -> bool:
        return name in self.types or name in self.attributes


def _declare(statements: Iterable[Statement], declared: _Declared, findings: list[Finding]) -> None:
    for statement in statements:
        if isinstance(statement, TypeDecl | AttributeDecl):
            earlier = declared.types.get(statement.name) or declared.attributes.get(statement.name)
            if earlier is not None:
                by = "AOSP" if earlier.source == PLATFORM_SOURCE else str(earlier)
                findings.append(Finding(statement.where, f"{statement.name} is declared already (by {by})"))
                continue
            if isinstance(statement, TypeDecl):
                declared.types[statement.name] = statement.where
                declared.type_attributes[statement.name] = set(statement.attributes)
            else:
                declared.attributes[statement.name] = statement.where
        elif isinstance(statement, TypeAttribute) and statement.type in declared.type_attributes:
            declared.type_attributes[statement.type].update(statement.attributes)


def _check_names(statement: Statement, declared: _Declared, findings: list[Finding]) -> None:
    """Types and attributes a statement names must be declared."""

    def need(name: str, what: str = "type or attribute") -> None:
        if not declared.known(name):
            findings.append(Finding(statement.where, f"{what} {name} is used but never declared"))

    def need_attribute(name: str) -> None:
        if name in declared.types:
            findings.append(Finding(statement.where, f"{name} is a type, not an attribute"))
        elif name not in declared.attributes:
            need(name, "attribute")

    if isinstance(statement, TypeDecl):
        for attribute in statement.attributes:
            need_attribute(attribute)
    elif isinstance(statement, TypeAttribute):
        if statement.type not in declared.types:
            need(statement.type, "type")
        for attribute in statement.attributes:
            need_attribute(attribute)
    elif isinstance(statement, ExpandAttribute):
        for name in statement.names.mentioned:
            need_attribute(name)
    elif isinstance(statement, Rule | Transition):
        for name in statement.source.mentioned:
            need(name)
        for name in statement.target.mentioned:
            if name != "self":
                need(name)
        if isinstance(statement, Transition):
            if statement.result in declared.attributes:
                findings.append(Finding(statement.where, f"{statement.result} is an attribute: nothing can be one"))
            elif statement.result not in declared.types:
                need(statement.result, "type")


def _check_classes(statement: Statement, classes: Mapping[str, tuple[str, ...]], findings: list[Finding]) -> None:
    """Classes and permissions must be the kernel's (or listed userspace ones)."""
    if not isinstance(statement, Rule | Transition):
        return
    known: list[str] = []
    for name in statement.classes.mentioned:
        if name in classes:
            known.append(name)
        else:
            findings.append(
                Finding(
                    statement.where,
                    f"unknown class {name}: not in {KERNEL_NAME}'s classmap.h, nor an Android userspace class "
                    "the sketch declares it uses",
                )
            )
    if isinstance(statement, Transition):
        return
    for permission in statement.permissions.mentioned:
        for name in known:
            if permission not in classes[name]:
                findings.append(Finding(statement.where, f"class {name} has no permission {permission}"))


def check_policy(
    parsed: Parsed, platform: Parsed, classes: Mapping[str, tuple[str, ...]]
) -> tuple[list[Finding], _Declared]:
    findings = list(parsed.findings)
    declared = _Declared()
    _declare(platform.statements, declared, [])
    _declare(parsed.statements, declared, findings)
    for statement in parsed.statements:
        _check_names(statement, declared, findings)
        _check_classes(statement, classes, findings)
    return findings, declared


def _check_label_types(entries: Iterable[FileContext | GenfsContext], declared: _Declared) -> list[Finding]:
    findings: list[Finding] = []
    for entry in entries:
        if entry.type is None:
            continue
        if entry.type in declared.attributes:
            findings.append(Finding(entry.where, f"{entry.type} is an attribute: files are labelled with types"))
        elif entry.type not in declared.types:
            findings.append(Finding(entry.where, f"type {entry.type} is not declared"))
    return findings


def _check_coverage(
    statements: Sequence[Statement],
    declared: _Declared,
    labelled: set[str],
) -> list[Finding]:
    """Every file type the sketch declares labels something, and every
    domain it declares can be entered."""
    findings: list[Finding] = []
    created = {s.result for s in statements if isinstance(s, Transition)}
    entered = {s.result for s in statements if isinstance(s, Transition) and "process" in s.classes.included}
    for statement in statements:
        if not isinstance(statement, TypeDecl):
            continue
        kinds = declared.type_attributes.get(statement.name, set())
        if kinds & FILE_ATTRIBUTES and statement.name not in labelled | created:
            findings.append(
                Finding(
                    statement.where,
                    f"{statement.name} is a file type that nothing labels a file with "
                    "(no file_contexts or genfs_contexts entry, no type_transition)",
                )
            )
        if "domain" in kinds and statement.name not in entered:
            findings.append(Finding(statement.where, f"domain {statement.name} has no way in (no process transition)"))
    return findings


def _inside(regex: str) -> tuple[str, str] | None:
    """For a file_contexts regex, a path it labels and that path's parent
    directory, when the regex says plainly which: `/a/b` (a file in /a) or
    `/a/b(/.*)?` (/a/b and whatever is in it)."""
    if regex.endswith("(/.*)?"):
        stem = regex.removesuffix("(/.*)?")
        if not _has_meta(stem):
            plain = stem.replace("\\", "")
            return f"{plain}/x", plain
        return None
    if _has_meta(regex):
        return None
    plain = regex.replace("\\", "")
    return plain, plain.rsplit("/", 1)[0] or "/"


def _check_transitions(statements: Sequence[Statement], entries: Sequence[FileContext]) -> list[Finding]:
    """A type_transition for files names the type of the directory they
    are created in; file_contexts says what that directory's type is."""
    findings: list[Finding] = []
    for statement in statements:
        if not isinstance(statement, Transition) or not set(statement.classes.included) & FILE_CLASSES:
            continue
        parent_type = statement.target.single()
        if parent_type is None:
            continue
        for entry in entries:
            if entry.type != statement.result or entry.where.source == PLATFORM_SOURCE:
                continue
            paths = _inside(entry.regex)
            if paths is None:
                continue
            path, parent = paths
            label = lookup(parent, entries, "-d")
            if label is not None and label.type != parent_type:
                findings.append(
                    Finding(
                        statement.where,
                        f"type_transition names {parent_type} as the directory type, but the files labelled "
                        f"{statement.result} ({path}, {entry.where}) are created in {parent}, which file_contexts "
                        f"labels {label.type} ({label.where}): the transition never applies",
                    )
                )
    return findings


@dataclass
class Report:
    findings: list[Finding]
    parsed: Parsed
    file_contexts: list[FileContext]
    genfs_contexts: list[GenfsContext]


def all_classes(classmap: ClassMap) -> dict[str, tuple[str, ...]]:
    classes = {name: definition.permissions for name, definition in classmap.classes.items()}
    for name, permissions in USERSPACE_CLASSES.items():
        if name in classes:
            raise ValueError(f"{name} is a kernel class: it does not belong in USERSPACE_CLASSES")
        classes[name] = permissions
    return classes


def _platform() -> Parsed:
    parsed = parse_policy([SourceFile(PLATFORM_SOURCE, PLATFORM_POLICY)])
    assert not parsed.findings, parsed.findings
    return parsed


def check(sketch: Sketch, classmap: ClassMap) -> Report:
    """Everything but the compilation; the findings are empty when the
    sketch passes."""
    parsed = parse_policy(sketch.policy)
    findings, declared = check_policy(parsed, _platform(), all_classes(classmap))
    file_contexts: list[FileContext] = []
    genfs_contexts: list[GenfsContext] = []
    if sketch.file_contexts is not None:
        file_contexts, problems = parse_file_contexts(sketch.file_contexts)
        findings += problems
    if sketch.genfs_contexts is not None:
        genfs_contexts, problems = parse_genfs_contexts(sketch.genfs_contexts)
        findings += problems
    findings += _check_label_types([*file_contexts, *genfs_contexts], declared)
    labelled = {entry.type for entry in file_contexts if entry.type is not None}
    labelled |= {entry.type for entry in genfs_contexts}
    findings += _check_coverage(parsed.statements, declared, labelled)
    findings += _check_transitions(parsed.statements, [*platform_file_contexts(), *file_contexts])
    unique = list(dict.fromkeys(findings))
    unique.sort(key=lambda f: (f.where.source, f.where.line))
    return Report(unique, parsed, file_contexts, genfs_contexts)


# ---------------------------------------------------------------------------
# Compilation

# The kernel's initial SIDs, in its order (initial_sid_to_string.h), with
# the names policies keep for the unused ones.
INITIAL_SIDS = (
    *("kernel", "security", "unlabeled", "fs", "file", "file_labels", "init", "any_socket", "port", "netif"),
    *("netmsg", "node", "igmp_packet", "icmp_socket", "tcp_socket", "sysctl_modprobe", "sysctl", "sysctl_fs"),
    *("sysctl_kernel", "sysctl_net", "sysctl_net_unix", "sysctl_vm", "sysctl_dev", "kmod", "policy"),
    *("scmp_packet", "devnull"),
)
CATEGORIES = 1024  # c0 ... c1023, as Android
MLS_RANGE = f"s0 - s0:c0.c{CATEGORIES - 1}"


def _line_marker(name: str) -> list[str]:
    """checkpolicy's #line: it takes a file name only with line 1, and then
    counts the directive's own line, so a second directive resets the count."""
    return [f'#line 1 "{name}"', "#line 1"]


def _class_declarations(classes: Mapping[str, ClassDef]) -> list[str]:
    lines = ["# Classes: " + KERNEL_NAME + "'s classmap.h, then Android userspace ones"]
    lines += [f"class {name}" for name in classes]
    lines += [f"class {name}" for name in USERSPACE_CLASSES]
    return lines


def _access_vectors(classmap: ClassMap) -> list[str]:
    lines = ["# Common permission sets and each class's permissions"]
    lines += [f"common {name} {{ {' '.join(perms)} }}" for name, perms in classmap.commons.items()]
    for definition in classmap.classes.values():
        inherits = f" inherits {definition.common}" if definition.common else ""
        own = f" {{ {' '.join(definition.own)} }}" if definition.own else ""
        lines.append(f"class {definition.name}{inherits}{own}")
    lines += [f"class {name} {{ {' '.join(perms)} }}" for name, perms in USERSPACE_CLASSES.items()]
    return lines


def _mls() -> list[str]:
    lines = ["# MLS: one sensitivity, Android's categories", "sensitivity s0;", "dominance { s0 }"]
    lines += [f"category c{number};" for number in range(CATEGORIES)]
    lines += [f"level s0:c0.c{CATEGORIES - 1};", "mlsconstrain process { transition } (h1 dom h2);"]
    return lines


def _file_contexts_as_fs_use(source: SourceFile) -> list[str]:
    """One line per line of file_contexts, with an fs_use_trans statement
    on each entry's line: checkpolicy validates the entry's context (its
    type must be a type of the policy) and reports a problem at that line.
    fs_use rather than genfscon: checkpolicy reports an error at the token
    after the statement, which for fs_use is its own ";"."""
    lines = _line_marker(source.name)
    entries, _ = parse_file_contexts(source)
    by_line = {entry.where.line: entry for entry in entries}
    for number in range(1, source.text.count("\n") + 2):
        entry = by_line.get(number)
        if entry is None or entry.type is None:
            lines.append("")
        else:
            # A made-up file system per entry: one fs_use each.
            lines.append(f"fs_use_trans file_contexts_line{number} {entry.context};")
    return lines


def policy_conf(sketch: Sketch, classmap: ClassMap) -> str:
    """A policy.conf of the boilerplate, the AOSP stand-in and the sketch."""
    platform = parse_policy([SourceFile(PLATFORM_SOURCE, PLATFORM_POLICY)])
    sketch_policy = parse_policy(sketch.policy)
    lines = ["# Generated by tools/sepolicy_check.py; compile with checkpolicy -M."]
    lines += _class_declarations(classmap.classes)
    lines += ["# Initial SIDs"] + [f"sid {name}" for name in INITIAL_SIDS]
    lines += _access_vectors(classmap)
    lines += _mls()
    lines += ["# AOSP stand-in", *_line_marker(PLATFORM_SOURCE)]
    lines += [text for _, text in platform.expanded]
    for name, text in sketch_policy.expanded:
        lines += [*_line_marker(name), text]
    lines += [
        *_line_marker("(boilerplate)"),
        "role r;",
        "role r types domain;",
        f"user u roles {{ r }} level s0 range {MLS_RANGE};",
        "sid kernel u:r:kernel:s0",
    ]
    lines += [f"sid {name} u:object_r:unlabeled:s0" for name in INITIAL_SIDS if name != "kernel"]
    lines += ["fs_use_trans tmpfs u:object_r:tmpfs:s0;", "fs_use_trans devtmpfs u:object_r:device:s0;"]
    if sketch.file_contexts is not None:
        lines += _file_contexts_as_fs_use(sketch.file_contexts)
    lines += [*_line_marker(PLATFORM_SOURCE), PLATFORM_GENFS_CONTEXTS]
    if sketch.genfs_contexts is not None:
        lines += [*_line_marker(sketch.genfs_contexts.name), sketch.genfs_contexts.text]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Compiled:
    command: tuple[str, ...]
    returncode: int
    output: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def compile_policy(conf: str, checkpolicy: str, workdir: Path) -> Compiled:
    conf_path = workdir / "policy.conf"
    conf_path.write_text(conf)
    command = (
        checkpolicy,
        "-M",
        "-c",
        str(POLICY_VERSION),
        "-o",
        str(workdir / f"policy.{POLICY_VERSION}"),
        str(conf_path),
    )
    result = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False)
    return Compiled(command, result.returncode, (result.stdout + result.stderr).strip())


# ---------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sketch", nargs="?", type=Path, default=SKETCH_DIR, help="a vendor sepolicy directory")
    parser.add_argument("--keep", type=Path, help="write policy.conf and the compiled policy into this directory")
    args = parser.parse_args(argv)
    try:
        classmap = load_classmap()
        checkpolicy = find_checkpolicy()
    except ToolMissing as error:
        print(f"sepolicy_check: {error}", file=sys.stderr)
        return 2
    sketch = load_sketch(args.sketch)
    report = check(sketch, classmap)
    print(f"{KERNEL_NAME} classmap.h: {len(classmap.classes)} classes")
    for finding in report.findings:
        print(finding)
    print(f"{_display(args.sketch)}: {len(report.findings)} finding(s)")
    with tempfile.TemporaryDirectory(prefix="sepolicy-check-") as scratch:
        workdir = args.keep or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        compiled = compile_policy(policy_conf(sketch, classmap), checkpolicy, workdir)
    print(f"{' '.join(compiled.command[:4])}: {'ok' if compiled.ok else 'FAILED'}")
    if compiled.output:
        print(compiled.output)
    return 0 if compiled.ok and not report.findings else 1


if __name__ == "__main__":
    sys.exit(main())
