"""A research session: its tag, directory, lock, persisted state and git worktree.

A session lives in <root>/<tag>/ (root defaults to <repo>/outputs/research): results.tsv (the
ledger), state.json (written via temp + rename), proposals/, runs/ and worktree/, a git worktree
on branch research/<tag>. The user's own checkout and branch are never touched: every commit,
reset and checkout happens in the worktree. The branch tip is always the best commit, except
while a candidate is being run on top of it.

Usage: session = Session.open(tag, resume, base_overrides, repo, root, base); ...; session.close()
"""
from __future__ import annotations

import datetime as dt
import errno
import json
import os
import re
import shutil
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from src.lab.proposal import InvalidProposal
from src.harness.paths import REPO

TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
BOT = {"GIT_AUTHOR_NAME": "overnight", "GIT_AUTHOR_EMAIL": "overnight@localhost",
       "GIT_COMMITTER_NAME": "overnight", "GIT_COMMITTER_EMAIL": "overnight@localhost"}


class SessionError(RuntimeError):
    """Something about the session (repo, tag, lock, disk) that the user must fix; the message says how."""


def disk_error(e: OSError, what: str) -> SessionError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return SessionError(f"disk full while writing {what}: free some space, then resume the session "
                            "(search.resume=true); nothing recorded so far is lost")
    return SessionError(f"could not write {what}: {e}")


def atomic_write(path: Path, text: str) -> None:
    """Write `path` via a temp file + fsync + rename: readers see the old or the new file, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise disk_error(e, str(path)) from e


class Git:
    """git -C <cwd> ..., raising SessionError with git's own message on failure."""

    def __init__(self, cwd: Path):
        self.cwd = Path(cwd)
        self.env = None

    def __call__(self, *args: str, input: Optional[str] = None, check: bool = True) -> str:
        try:
            out = subprocess.run(["git", *args], cwd=self.cwd, input=input, capture_output=True, text=True,
                                 env=self.env, timeout=120)
        except FileNotFoundError:
            raise SessionError("git is not installed or not on PATH; the research loop keeps its history in git") from None
        if check and out.returncode != 0:
            raise SessionError(f"git {' '.join(args)} failed in {self.cwd}: {(out.stderr or out.stdout).strip()}")
        return out.stdout.strip() if check else out

    def ok(self, *args: str) -> bool:
        return self(*args, check=False).returncode == 0


def repo_root(path: Path) -> Path:
    if not Path(path).is_dir():
        raise SessionError(f"search.repo={path} is not a directory; point it at a git checkout of this project")
    out = Git(path)("rev-parse", "--show-toplevel", check=False)
    if out.returncode != 0:
        raise SessionError(f"{path} is not a git checkout ({out.stderr.strip()}); the research loop records every "
                           "experiment as a commit on a branch: run it inside a clone of the project (git clone ...) "
                           "or set search.repo=<checkout>")
    return Path(out.stdout.strip())


def default_tag(today: Optional[dt.date] = None) -> str:
    today = today or dt.date.today()
    return today.strftime("%b%d").lower().replace(" ", "")  # nov26


@dataclass
class InFlight:
    """The experiment being run right now, persisted before it starts so a resume can finish it."""
    exp: str  # ledger id (base-1, exp-004)
    attempt: int  # 1, then 2... after a stalled run or a resume
    commit: str  # candidate commit (or the base commit for baseline runs)
    run_dir: str
    pid: Optional[int] = None  # the train process (its own process group)
    started: float = 0.0
    worker: Optional[int] = None  # the worker slot running it (None: the session's own worktree and runner)
    parent: str = ""  # the best commit it was branched from
    job: str = ""  # launcher=submitit_*: the job id of the attempt (a resume re-attaches to it)
    job_folder: str = ""  # ... and submitit's folder
    proposed: str = ""  # when it was proposed (ISO time)
    others: list[int] = field(default_factory=list)  # its runs on borrowed workers (confirmation pairs side by side)


@dataclass
class SessionState:
    tag: str
    repo: str
    branch: str
    base_commit: str
    created: str
    base_overrides: list[str] = field(default_factory=list)  # the session's train overrides (fixed)
    parent_run_id: Optional[str] = None  # MLflow parent run of the session
    in_flight: Optional[InFlight] = None  # read only: a session from before `running` held every one (a resume)
    running: list[InFlight] = field(default_factory=list)  # every experiment in flight, one entry per worker
    invocations: int = 0  # how many times the session was started or resumed
    tracking_uri: Optional[str] = None  # MLflow store of the session (the report logs to it)
    tracking_experiment: str = "overnight"
    agent: str = ""
    search: dict = field(default_factory=dict)  # the search knobs of its last invocation (SearchConfig)
    agent_config: dict = field(default_factory=dict)  # the agent's options (AgentConfig subclass `agent_schema`)
    agent_schema: str = ""
    search_space: dict = field(default_factory=dict)  # SearchSpaceConfig
    launcher: dict = field(default_factory=dict)  # LauncherConfig (a resume re-attaches to its jobs)
    baseline: dict = field(default_factory=dict)  # the train part of the search app's config (TrainConfig)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "SessionState":
        d = json.loads(text)
        if d.get("in_flight"):
            d["in_flight"] = InFlight(**d["in_flight"])
        d["running"] = [InFlight(**x) for x in d.get("running") or []]
        return cls(**d)


@dataclass(frozen=True)
class Plan:
    """A new session that passed every check but does not exist yet (the preflight runs in between)."""
    tag: str
    repo: Path
    dir: Path
    base_commit: str


class Worktree:
    """A git worktree of the session's repository and what happens in it: candidates committed, resets.

    The session's own (on branch research/<tag>) and each worker's (search.workers > 1: a detached HEAD
    under <session>/workers/w<i>, see ensure()) are both one; refs are shared by every worktree."""

    def __init__(self, worktree: Path, tag: str, env: Optional[dict] = None):
        self.worktree = Path(worktree)
        self.git = Git(self.worktree)
        self.git.env = env
        self.tag = tag

    @property
    def conf_dir(self) -> Path:
        return self.worktree / "conf"

    @property
    def preset_name(self) -> str:
        return preset_name(self.tag)

    @property
    def preset_path(self) -> Path:
        return self.conf_dir / "experiment" / f"{self.preset_name}.yaml"

    def head(self) -> str:
        return self.git("rev-parse", "HEAD")

    def reset(self, commit: str) -> None:
        """Put the branch and the worktree exactly at `commit` (the best): discards a candidate."""
        self.git("reset", "--hard", "--quiet", commit)
        self.git("clean", "-fdq")

    def check_patch(self, patch: str) -> Optional[str]:
        """None if the patch applies cleanly to the worktree's HEAD, else git's reason."""
        out = self.git("apply", "--check", "--recount", "--whitespace=nowarn", "-", input=_nl(patch), check=False)
        return None if out.returncode == 0 else (out.stderr or out.stdout).strip()

    def commit_candidate(self, message: str, patch: Optional[str], preset: Optional[str]) -> str:
        """Apply the patch and write the preset on top of HEAD, commit, return the new sha."""
        if patch:
            self.git("apply", "--index", "--recount", "--whitespace=nowarn", "-", input=_nl(patch))
            if self.git("diff", "--cached", "--quiet", check=False).returncode == 0:
                raise InvalidProposal("the patch changes nothing: it applies, but every file it touches is left as "
                                      "it was (its + and - lines are the same). Propose a patch that changes the "
                                      "code, or only overrides")
        path = self.preset_path
        if preset is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(preset)
            self.git("add", "--", str(path.relative_to(self.worktree)))
        elif path.exists():
            self.git("rm", "-q", "--", str(path.relative_to(self.worktree)))
        if self.git("status", "--porcelain", "--untracked-files=no") == "":
            raise InvalidProposal("the proposal changes nothing: its code and overrides equal the current best's")
        self.git("commit", "-q", "-m", message)
        return self.head()

    def tree(self, commit: str, path: str) -> str:
        """The git object id of `path` at `commit`: equal ids, equal contents (what the code of a run was)."""
        return self.git("rev-parse", f"{commit}:{path}")

    def keep_ref(self, exp: str, commit: str) -> None:
        """refs/research/<tag>/<exp>: every candidate stays inspectable (and safe from gc) after a reset."""
        self.git("update-ref", f"refs/research/{self.tag}/{exp}", commit)

    def ensure(self, repo_git: Git, commit: str) -> None:
        """A worker's worktree (detached HEAD) at `commit`, created on first use or after it was deleted."""
        if (self.worktree / ".git").exists():
            self.reset(commit)
            return
        repo_git("worktree", "prune")
        shutil.rmtree(self.worktree, ignore_errors=True)
        self.worktree.parent.mkdir(parents=True, exist_ok=True)
        repo_git("worktree", "add", "--detach", "--quiet", str(self.worktree), commit)


class Session(Worktree):
    def __init__(self, dir: Path, state: SessionState, lock_fd: int):
        self.dir = dir
        self.state = state
        self._lock_fd = lock_fd
        super().__init__(dir / "worktree", state.tag)
        self.repo_git = Git(Path(state.repo))
        self.dirty_warning = ""  # a new session: uncommitted changes in src/ or conf/ it does not include
        self.lock = threading.RLock()  # search.workers > 1: state, ledger and branch writes of the worker threads
        if not Git(Path(state.repo))("config", "user.email", check=False).stdout.strip():
            self.git.env = {**os.environ, **BOT}  # commits need an identity; the user has none configured

    # ------------------------------------------------------------------ paths
    @property
    def runs_dir(self) -> Path:
        return self.dir / "runs"

    # ------------------------------------------------------------------ open / close
    @classmethod
    def open(cls, tag: Optional[str], resume: bool, base_overrides: list[str], repo: Optional[str] = None,
             root: Optional[str] = None, base: str = "HEAD") -> "Session":
        """Create session `tag` (or today's), or reopen it when `resume`; takes the session's lock."""
        if resume:
            repo_path = repo_root(Path(repo).expanduser() if repo else REPO)
            root_path = Path(root).expanduser() if root else repo_path / "outputs" / "research"
            check_tag(tag)
            if tag is None:
                raise SessionError("search.resume=true needs search.tag=<tag> of the session to continue; sessions: "
                                   + (", ".join(list_sessions(root_path)) or "none"))
            d = root_path / tag
            if not (d / "state.json").exists():
                raise SessionError(f"no session {tag!r} to resume under {root_path} (no state.json); sessions: "
                                   + (", ".join(list_sessions(root_path)) or "none"))
            return cls._reopen(d)
        return cls.create(cls.plan(tag, repo, root, base), base_overrides)

    @classmethod
    def plan(cls, tag: Optional[str], repo: Optional[str] = None, root: Optional[str] = None,
             base: str = "HEAD") -> Plan:
        """A new session, checked (repo, tag free, base commit) but not created yet: SessionError if it cannot be."""
        repo_path = repo_root(Path(repo).expanduser() if repo else REPO)
        root_path = Path(root).expanduser() if root else repo_path / "outputs" / "research"
        check_tag(tag)
        repo_git = Git(repo_path)
        if tag is None:
            tag = _free_tag(default_tag(), root_path, repo_git)
        d = root_path / tag
        if (d / "state.json").exists():
            raise SessionError(f"session {tag!r} already exists in {d}; continue it with search.tag={tag} "
                               "search.resume=true, or pick a new search.tag")
        if repo_git.ok("rev-parse", "--verify", "--quiet", f"refs/heads/research/{tag}"):
            raise SessionError(f"branch research/{tag} already exists in {repo_path} but has no session directory; "
                               f"pick another search.tag, or delete the branch (git branch -D research/{tag})")
        return Plan(tag, repo_path, d, resolve_commit(repo_path, base))

    @classmethod
    def create(cls, plan: Plan, base_overrides: list[str]) -> "Session":
        """Make the planned session: its directory (locked), branch research/<tag> and worktree."""
        d, repo_git = plan.dir, Git(plan.repo)
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise disk_error(e, str(d)) from e
        lock_fd = _lock(d)
        try:
            dirty = repo_git("status", "--porcelain", "--untracked-files=no", "--", "src", "conf")
            state = SessionState(tag=plan.tag, repo=str(plan.repo), branch=f"research/{plan.tag}",
                                 base_commit=plan.base_commit, created=dt.datetime.now().isoformat(timespec="seconds"),
                                 base_overrides=list(base_overrides))
            repo_git("worktree", "add", "-b", state.branch, str(d / "worktree"), plan.base_commit)
            (d / "runs").mkdir(exist_ok=True)
            (d / "proposals").mkdir(exist_ok=True)
            s = cls(d, state, lock_fd)
            s.dirty_warning = dirty
            s.save()
            return s
        except BaseException:
            os.close(lock_fd)
            raise

    @classmethod
    def _reopen(cls, d: Path) -> "Session":
        lock_fd = _lock(d)
        try:
            state = SessionState.from_json((d / "state.json").read_text())
            s = cls(d, state, lock_fd)
            repo_git = Git(Path(state.repo))
            if not (s.worktree / ".git").exists():  # the worktree was deleted: re-attach the branch
                repo_git("worktree", "prune")
                repo_git("worktree", "add", str(s.worktree), state.branch)
            (d / "runs").mkdir(exist_ok=True)
            (d / "proposals").mkdir(exist_ok=True)
            return s
        except BaseException:
            os.close(lock_fd)
            raise

    def save(self) -> None:
        with self.lock:
            atomic_write(self.dir / "state.json", self.state.to_json())

    # ------------------------------------------------------------------ what is in flight (state.running)
    def worker_tree(self, index: int) -> Worktree:
        """Worker `index`'s worktree, <session>/workers/w<index> (created by its first ensure())."""
        # no `git gc --auto` from a worker's commit while other worktrees of the repo are busy
        env = {**(self.git.env or os.environ), "GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "gc.auto",
               "GIT_CONFIG_VALUE_0": "0"}
        return Worktree(self.dir / "workers" / f"w{index}", self.tag, env)

    def track(self, fl: InFlight) -> None:
        """Persist `fl` (before its run starts) as its worker's entry of state.running, replacing the one before."""
        with self.lock:
            st = self.state
            old = next((x for x in st.running if x.worker == fl.worker), None)
            if old is not None and (old.exp, old.attempt) == (fl.exp, fl.attempt) and old.job and not fl.job:
                fl.pid, fl.job, fl.job_folder = old.pid, old.job, old.job_folder  # a re-attached job stays known
            st.running = [x for x in st.running if x.worker != fl.worker] + [fl]
            self.save()

    def track_pid(self, worker: Optional[int], pid: int, job: str = "", job_folder: str = "") -> None:
        with self.lock:
            for fl in self.state.running:
                if fl.worker == worker:
                    fl.pid, fl.job, fl.job_folder = pid, job or fl.job, job_folder or fl.job_folder
            self.save()

    def track_other(self, worker: Optional[int], pid: int) -> None:
        """A process of worker `worker`'s experiment running on a borrowed worker (a resume stops it too)."""
        with self.lock:
            for fl in self.state.running:
                if fl.worker == worker:
                    fl.others = [*fl.others[-1:], pid]  # one at a time; the one before may be ending
            self.save()

    def untrack(self, worker: Optional[int]) -> None:
        with self.lock:
            self.state.running = [x for x in self.state.running if x.worker != worker]
            self.save()

    def close(self) -> None:
        if self._lock_fd is not None:
            try:
                os.ftruncate(self._lock_fd, 0)
            except OSError:
                pass
            os.close(self._lock_fd)
            self._lock_fd = None

    def discard(self) -> None:
        """Undo a session that never ran anything: its worktree, branch and directory."""
        self.close()
        self.repo_git("worktree", "remove", "--force", str(self.worktree), check=False)
        self.repo_git("branch", "-D", self.state.branch, check=False)
        shutil.rmtree(self.dir, ignore_errors=True)

def check_tag(tag: Optional[str]) -> None:
    if tag is not None and not TAG_RE.match(tag):
        raise SessionError(f"search.tag={tag!r} is not a valid session name; use letters, digits, '_', '-', '.' "
                           "(it names a directory and the branch research/<tag>)")


def resolve_commit(repo_path: Path, base: str) -> str:
    """The full sha of `base` in the checkout; SessionError when it names no commit."""
    out = Git(repo_path)("rev-parse", "--verify", "--quiet", f"{base}^{{commit}}", check=False)
    if out.returncode != 0:
        raise SessionError(f"search.base={base!r} is not a commit in {repo_path}; commit your work first "
                           "(the session branches from a commit) or set search.base=<sha|branch>")
    return out.stdout.strip()


def export(repo_path: Path, commit: str, dest: Path, paths: tuple[str, ...] = ("src", "conf")) -> None:
    """The files `paths` of `commit` written into `dest` (git archive): a session's code before it has a worktree."""
    archive = subprocess.run(["git", "archive", "--format=tar", commit, *paths], cwd=repo_path, capture_output=True,
                             timeout=120)
    if archive.returncode != 0:
        raise SessionError(f"git archive {commit[:7]} failed in {repo_path}: {archive.stderr.decode(errors='replace')}")
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(dest, filter="data")


def preset_name(tag: str) -> str:
    """The committed experiment preset holding a session's kept overrides: conf/experiment/<tag>_best.yaml."""
    return re.sub(r"[^A-Za-z0-9_]", "_", tag) + "_best"


def _nl(text: str) -> str:
    return text if text.endswith("\n") else text + "\n"


def _free_tag(tag: str, root: Path, git: Git) -> str:
    """today's tag, or the first of nov26b, nov26c, ... not taken by a session dir or a branch."""
    for suffix in [""] + [chr(c) for c in range(ord("b"), ord("z") + 1)]:
        t = tag + suffix
        if not (root / t).exists() and not git.ok("rev-parse", "--verify", "--quiet", f"refs/heads/research/{t}"):
            return t
    return f"{tag}-{int(time.time())}"


def list_sessions(root: Path) -> list[str]:
    """Session tags under root, oldest first."""
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if (p / "state.json").exists()]
    return [p.name for p in sorted(dirs, key=lambda p: (p / "state.json").stat().st_ctime)]


def _lock(d: Path) -> int:
    """Hold <dir>/session.lock (flock, released by the kernel even on kill -9); refuse a second live session."""
    path = d / "session.lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise disk_error(e, str(path)) from e
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:  # no flock (Windows): best effort, no lock
        pass
    except OSError:
        other = os.pread(fd, 200, 0).decode(errors="replace").strip()
        os.close(fd)
        raise SessionError(f"session {d.name!r} is already running ({other or 'pid unknown'}); wait for it to "
                           "finish, stop it (Ctrl-C or kill -INT <pid>), or pick another search.tag") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} since {dt.datetime.now().isoformat(timespec='seconds')}\n".encode(), 0)
    return fd
