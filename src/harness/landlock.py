"""OS-enforced file access for a process that runs research code: Linux Landlock, no privileges needed.

`restrict(read_paths, write_paths)` installs a Landlock ruleset on the calling thread (and every thread
and child it creates afterwards): from then on files open for reading only beneath read_paths (plus
what Python and torch need, system=True), for writing only beneath write_paths, directories list only
there, and nothing can be executed (no subprocess can exec a program). It cannot be lifted: a later
ruleset can only narrow it. Install it before research code is imported, after the process has opened
what it alone may read (the scorer: val.bin; training: train.bin), since an open file stays usable.
Threads that exist before the call are not restricted (ABI 7 has no thread sync): call it before
starting any. On a kernel without Landlock, or on macOS/Windows, it is a no-op that says why (macOS
offers no unprivileged equivalent; sandbox_init is deprecated), unless strict=True.

Usage: from src.harness.landlock import available, restrict
       r = restrict([data_dir / "train.bin", repo], [out_dir]); log.info("%s", r.reason)
"""
from __future__ import annotations

import ctypes
import os
import platform
import site
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

_SYSCALLS = {"x86_64": (444, 445, 446), "aarch64": (444, 445, 446), "riscv64": (444, 445, 446)}
CREATE_RULESET_VERSION = 1 << 0
RULE_PATH_BENEATH = 1
PR_SET_NO_NEW_PRIVS = 38

# filesystem rights (uapi/linux/landlock.h) and the ABI that introduced each
EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
REMOVE_DIR, REMOVE_FILE, MAKE_CHAR, MAKE_DIR, MAKE_REG = 1 << 4, 1 << 5, 1 << 6, 1 << 7, 1 << 8
MAKE_SOCK, MAKE_FIFO, MAKE_BLOCK, MAKE_SYM = 1 << 9, 1 << 10, 1 << 11, 1 << 12
REFER, TRUNCATE, IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15  # ABI 2, 3, 5
FS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 4: (1 << 15) - 1}  # >= 5: (1 << 16) - 1
FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV  # the only rights a rule on a file may carry
READ = READ_FILE | READ_DIR
WRITE = WRITE_FILE | REMOVE_DIR | REMOVE_FILE | MAKE_DIR | MAKE_REG | MAKE_SYM | REFER | TRUNCATE
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1  # ABI 4
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1  # ABI 6


class LandlockError(OSError):
    """Landlock is unavailable (strict=True) or the kernel refused the ruleset."""


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1  # __attribute__((packed)) in the uapi header: 12 bytes
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


@dataclass(frozen=True)
class Restriction:
    """What restrict() did: applied or not (and why), the ABI, the paths ruled, the seconds it took."""
    applied: bool
    abi: int
    reason: str
    read: tuple[str, ...] = ()
    write: tuple[str, ...] = ()
    skipped: tuple[str, ...] = field(default=())  # paths that do not exist here (no rule needed)
    seconds: float = 0.0


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


def _syscall(index: int, *args) -> int:
    nr = _SYSCALLS[platform.machine()][index]
    ret = _libc().syscall(ctypes.c_long(nr), *args)
    if ret < 0:
        err = ctypes.get_errno()
        raise LandlockError(err, f"landlock syscall {nr}: {os.strerror(err)}")
    return ret


def abi_version() -> int:
    """The kernel's Landlock ABI (7 on these machines' 6.x kernels); 0 where there is none."""
    if sys.platform != "linux" or platform.machine() not in _SYSCALLS:
        return 0
    try:
        return _syscall(0, None, ctypes.c_size_t(0), ctypes.c_uint32(CREATE_RULESET_VERSION))
    except LandlockError:  # ENOSYS (not built in) or EOPNOTSUPP (disabled at boot)
        return 0


def available() -> bool:
    return abi_version() > 0


def unavailable_reason() -> str:
    if sys.platform == "darwin":
        return ("macOS has no Landlock and no unprivileged per-process file sandbox (sandbox_init is deprecated); "
                "file access is not OS-restricted there, only by the static contract and the audit hooks")
    if sys.platform != "linux":
        return f"{sys.platform} has no Landlock; file access is not OS-restricted"
    if platform.machine() not in _SYSCALLS:
        return f"Landlock syscall numbers unknown for {platform.machine()}"
    return "" if available() else "the kernel has no Landlock (not built in, or not in the lsm= boot list)"


def system_read_paths(cuda: bool = False) -> list[str]:
    """What Python and torch read after start-up: the interpreter, the libraries, /proc/self, a few devices."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sysconfig.get_paths()["stdlib"],
             *site.getsitepackages(), site.getusersitepackages(),
             "/proc/self", "/proc/cpuinfo", "/sys/devices/system/cpu", "/dev/null", "/dev/urandom",
             "/dev/random", "/etc/ld.so.cache", "/usr/lib", "/lib", "/lib64", "/usr/lib64", "/usr/share/zoneinfo"}
    if cuda:
        paths |= {"/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/proc/driver/nvidia",
                  "/sys/bus/pci", "/sys/devices", *map(str, Path("/dev").glob("nvidia[0-9]*"))}
    return sorted(paths)


def _add_rule(ruleset: int, path: str, access: int) -> bool:
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:  # gone, a dangling link, a loop: nothing to rule
        return False
    try:
        if not os.path.isdir(path):
            access &= FILE_RIGHTS
        attr = _PathBeneathAttr(access, fd)
        _syscall(1, ctypes.c_int(ruleset), ctypes.c_int(RULE_PATH_BENEATH), ctypes.byref(attr), ctypes.c_uint32(0))
    finally:
        os.close(fd)
    return True


def restrict(read_paths, write_paths=(), *, system: bool = True, cuda: bool = False, exec_paths=(),
             deny_tcp: bool = False, scope_signals: bool = False, strict: bool = False,
             handled: Optional[int] = None) -> Restriction:
    """Allow reads only beneath read_paths (+ system_read_paths() if system), writes beneath write_paths.

    exec_paths: where programs may be executed (none: no subprocess can exec anything). deny_tcp (ABI >= 4):
    no TCP bind or connect. scope_signals (ABI >= 6): no signal to a process outside this domain.
    strict: LandlockError where Landlock is unavailable instead of a no-op. handled: the rights ruled at all (default:
    every right the kernel knows); a right not handled stays as it was everywhere (hide() leaves executing alone).
    """
    t0 = time.perf_counter()
    abi = abi_version()
    if abi == 0:
        if strict:
            raise LandlockError(unavailable_reason())
        return Restriction(False, 0, f"not restricted: {unavailable_reason()}")
    fs = FS_BY_ABI.get(abi, (1 << 16) - 1) & (handled if handled is not None else -1)
    attr = _RulesetAttr(fs, (NET_BIND_TCP | NET_CONNECT_TCP) if deny_tcp and abi >= 4 else 0,
                        SCOPE_SIGNAL if scope_signals and abi >= 6 else 0)
    size = ctypes.sizeof(attr) if abi >= 6 else 16 if abi >= 4 else 8
    ruleset = _syscall(0, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    reads = [str(p) for p in read_paths] + (system_read_paths(cuda) if system else [])
    writes = [str(p) for p in write_paths]
    skipped = []
    try:
        for paths, access in ((reads, READ), (writes, READ | WRITE), ([str(p) for p in exec_paths], READ | EXECUTE)):
            for p in paths:
                if not _add_rule(ruleset, p, access & fs):
                    skipped.append(p)
        if _libc().prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise LandlockError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
        _syscall(2, ctypes.c_int(ruleset), ctypes.c_uint32(0))
    finally:
        os.close(ruleset)
    what = (f"reads beneath {len(reads) - len(skipped)} paths, writes beneath {len(writes)}"
            + (", no exec" if fs & EXECUTE else "") + (", no TCP" if deny_tcp and abi >= 4 else ""))
    return Restriction(True, abi, f"Landlock ABI {abi}: {what}",
                       tuple(reads), tuple(writes), tuple(skipped), time.perf_counter() - t0)


_HIDDEN: list[Restriction] = []  # what hide() did in this process


def complement(hidden) -> tuple[list[str], list[str]]:
    """Every path of the file system except `hidden` and their ancestors, as few rules as cover it: the entries of
    each ancestor directory of a hidden path that neither are hidden nor lead to one (a symbolic link counts as what
    it points to: a rule follows it, so one to an ancestor would open everything again). Returns (read-only, read and
    write): the entries beside a hidden file (the data set's manifest, token byte lengths, train split) are read-only,
    so nothing the scorer trusts can be rewritten; everything else keeps both."""
    hidden = {Path(os.path.realpath(h)) for h in hidden}
    ancestors = {a for h in hidden for a in h.parents}
    beside = {h.parent for h in hidden}
    read_only, read_write = [], []
    for d in sorted(ancestors):
        try:
            entries = list(os.scandir(d))
        except OSError:
            continue
        for e in entries:
            target = Path(os.path.realpath(e.path))
            if target not in hidden and target not in ancestors:
                (read_only if d in beside or target.parent in beside else read_write).append(e.path)
    return sorted(read_only), sorted(read_write)


def hide(hidden, strict: bool = False) -> Restriction:
    """Make `hidden` unreadable and unwritable to this process and everything it starts (Landlock), and the files
    beside them read-only; all else as it was (executing is not ruled). The directories on the way to a hidden
    file can then be neither listed nor written: a process that writes temporary files should point TMPDIR
    elsewhere first (src/harness/train.py does). The training process hides the held-out splits this way."""
    if _HIDDEN:  # a second job of a sweep in the same process: the first one's ruleset holds (it cannot be lifted)
        return _HIDDEN[0]
    hidden = [str(h) for h in hidden if os.path.exists(h)]
    if not hidden:
        return Restriction(False, abi_version(), "not restricted: nothing to hide")
    read_only, read_write = complement(hidden)
    r = restrict(read_only, read_write, system=False, handled=READ | WRITE, strict=strict)
    if not r.applied:
        return r
    _HIDDEN.append(Restriction(True, r.abi, f"Landlock ABI {r.abi}: {len(hidden)} files hidden, {len(read_only)} "
                                            f"beside them read-only, all else as before ({len(read_write)} rules)",
                               r.read, r.write, r.skipped, r.seconds))
    return _HIDDEN[0]
