"""The scorer ("the judge"): val_bpb of a checkpoint, with its checks woven into the scoring pass itself.

The training process never opens the validation split and never computes the score. It saves a checkpoint
(weights + resolved config); this process reads the validation split and never imports research code. Two
model hosts (src/harness/host.py, child processes sandboxed before they import the experiment's code) turn
input ids into logits; the loss arithmetic, the checks and the verdict stay here, where research code cannot
reach them. The result goes back on stdout as one line carrying a nonce that only the starter of this
process knows, so nothing a host prints can pass for it.

The checks run on the scored batches, at the scoring shape and dtype, chosen with the OS's randomness when
the pass starts (a failure is the status `tampered` with the reason):
- causality and batch independence: a share of the scored batches (Audit.twin_share, at least four) gets a
  twin, run by the other host just before or after it: the rows permuted and each row's tokens after its
  own random position replaced by real validation text already scored. Every row of the twin must give
  bitwise the logits of its scored row up to its cut (a causal model on a fixed shape and dtype does: shown
  on CPU in fp32 and bf16 by tests/harness/test_score.py). The twin is real text of the same shape, on a
  host picked at random: a model cannot tell it from a scored batch. A model that looks ahead at a share q of
  positions escapes one twin row with probability 1 - q, all of them with (1 - q) ** twin_rows (in the verdict);
- no state across calls: scored batches are sent again later in the pass (the last at its end) to both hosts,
  and must give bitwise the same logits (a host remembers only what it was shown; the other never saw it);
- no change while scored: each host's first input is asked of the other host after two random batches and after
  the last (the probes), and must give bitwise the logits it gave at the start: weights switched after the first
  replies (both hosts at once, which the twins cannot see) are seen whenever they are in force at a probe;
- the floor: a val_bpb below the data set's floor (data.bpb_floor) is refused, never scored as a result;
- compute: on a CPU slot each host's CPU seconds, read from the kernel, must stay within what its forward passes
  need (HOST_FACTOR, CALL_FACTOR below): a model that trains before its first reply (hand-written gradients need
  no autograd) gives the same logits everywhere, so only its CPU time tells.
The pass is pipelined: the next request goes out as soon as a reply is read, so a host's forward pass runs
while this process judges the reply before it (the loss and the checks cost no wall time of their own).

Protocol: stdin line 1 = nonce (sent at start-up, so torch imports while training runs);
stdout `OVERNIGHT-SCORER-READY` once the imports are done; stdin line 2 = checkpoint path (or EOF to quit).
Stdout: `OVERNIGHT-SCORE <json>`.
Usage: scorer = Scorer(cwd, log_path).start(); ...train...; result = scorer.score(ckpt, timeout_s=600)
       python -m src.harness.score < (echo NONCE; echo run_dir/checkpoint.pt)
"""
from __future__ import annotations

import json
import math
import os
import random
import select
import sys
import time
from pathlib import Path
from subprocess import DEVNULL, Popen, TimeoutExpired
from typing import Iterator, NamedTuple, Optional

import torch
from tqdm import tqdm

from src.harness.config import DataConfig, TrainConfig, to_object
from src.harness.data import load_prepared, val_tokens
from src.harness.device import Runtime
from src.harness.evaluate import bpb_from_sums, token_nats, windows
from src.harness.host import BROKEN, HEADER, STATUS, read_exact
from src.harness.model_facts import model_facts
from src.harness.status import CRASH, NAN, OK, TAMPERED
# the starting side lives apart (no torch for the lab); re-exported: train.py and the tests import it from here
from src.harness.score_client import CHECKPOINT, MARKER, READY, SPLIT_ENV, Scorer, apply_verdict, stop  # noqa: F401
# Tolerance on logits: 20x the numeric noise measured between batch layouts of one input, at least
# FLOOR, at most CAP[dtype] (so a model cannot widen it for itself by being noisy on purpose).
FLOOR, NOISE_FACTOR = 1e-4, 20.0
CAP = {torch.float32: 1e-2, torch.bfloat16: 0.15, torch.float16: 0.05}
_now = time.perf_counter
# What a model host may spend on a CPU slot, in CPU seconds the kernel counts (all its threads, read from /proc by
# this process, out of the host's reach). A model that works before its first reply (training by hand-written
# gradients, say) gives every logit from the same trained model, so the twins and repeats agree; what gives it away
# is its CPU time. Work that changes the logits has to be done before the first reply (after it, the probes see
# the change), so the first reply is bound tightly and the others loosely (docs/protection.md has the figures).
# Checked every 0.2 s while a host computes (a host past its allowance is stopped at once), per token asked, in the
# run's training CPU seconds per trained token (or the session's baseline's, whichever is more: a recipe that draws
# rows it does not train on pays less per drawn token):
# - the first reply: HOST_FACTOR x that, + CALL_SLACK_S + LOAD_S + LOAD_S_PER_M per million nominal parameters
#   (model_facts of the config) for building the model. An honest forward pass costs 0.18-0.30 of a training step's
#   forward + backward + update per token (measured here): what is left is about half a training step's compute,
#   and a run can raise it only by wasting its own training. At the end of the pass the first reply must also stay
#   within CALL_FACTOR x the host's median per token over its other replies (+ the same slack and load);
# - every other reply: LATER_FACTOR x that, + CALL_SLACK_S (+ the load allowance again for the first request of a
#   shape the host has not computed yet: kernels are built per shape). Work done there changes nothing the probes
#   do not see; the bound stops a runaway host and leaves room for a recipe that trains more cheaply per token than
#   its forward pass costs (stochastic depth over 12 blocks: 0.7-0.8 of training per token measured).
HOST_FACTOR, LATER_FACTOR, CALL_FACTOR, MIN_CALLS = 0.6, 1.5, 2.0, 4
CALL_SLACK_S, LOAD_S, LOAD_S_PER_M = 0.1, 0.25, 0.05
try:
    _TICK = os.sysconf("SC_CLK_TCK")
except (AttributeError, ValueError, OSError):
    _TICK = 100


def cpu_seconds(pid: int) -> Optional[float]:
    """User + system CPU seconds of a process and all its threads, from the kernel (Linux); None elsewhere."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK
    except (OSError, ValueError, IndexError):
        return None


class HostBudget(NamedTuple):
    """A host's CPU allowance per reply (see HOST_FACTOR): per_token_s (training CPU seconds per token) x HOST_FACTOR
    (the first reply) or LATER_FACTOR (the others) for each token asked of it, load_s for building the model (the
    first reply) and for the first request of each new shape."""
    load_s: float
    per_token_s: float

    @staticmethod
    def of(cost: Optional[dict], nominal_params: int) -> Optional["HostBudget"]:
        """From the training run's cost ({"cpu_s": CPU seconds of its counted training, "tokens": tokens trained,
        "floor_per_token_s": the session baseline's, optional}, score_client.training_cost); None without one (no
        bound: the scorer's timeout is all there is)."""
        try:
            cpu, tokens = float(cost["cpu_s"]), float(cost["tokens"])
            floor = float(cost.get("floor_per_token_s") or 0.0)
        except (TypeError, KeyError, ValueError, AttributeError):
            return None
        if not (math.isfinite(cpu) and cpu > 0 and tokens > 0 and math.isfinite(floor)):
            return None
        return HostBudget(load_allowance(nominal_params), max(cpu / tokens, floor))

    def reply_s(self, tokens: int, first: bool, fresh: bool = False) -> float:
        """What one reply of `tokens` may cost: the first also builds the model; a later one of a shape the host has
        not computed before (`fresh`) builds its kernels."""
        factor = HOST_FACTOR if first else LATER_FACTOR
        return factor * self.per_token_s * tokens + CALL_SLACK_S + (self.load_s if first or fresh else 0.0)


def load_allowance(nominal_params: int) -> float:
    """CPU seconds for building the model (research imports, construction, weights), from the config's nominal size."""
    return LOAD_S + LOAD_S_PER_M * nominal_params / 1e6


class Tampered(Exception):
    """An integrity check failed: the reason, in words a researcher can act on."""


# ---------------------------------------------------------------------------- the checkpoint

def save_checkpoint(path: Path, model, cfg_dict: dict, device: str, dtype: str) -> Path:
    """Weights + the resolved config + the device type and autocast dtype the run trained with."""
    state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    tmp = Path(path).with_suffix(".tmp")
    torch.save({"model": state, "config": cfg_dict, "device": device, "dtype": dtype}, tmp)
    os.replace(tmp, path)
    return Path(path)


# ---------------------------------------------------------------------------- checks on the scored batches

class Twin(NamedTuple):
    """A twin of a scored batch: its rows permuted (`perm`: twin row i is scored row perm[i]), and each row's tokens
    after a random position `cuts[i]` replaced by real validation text from elsewhere. A causal model that scores
    each row on its own earlier tokens gives the twin's row i exactly the scored row's logits up to cuts[i]."""
    ids: torch.Tensor
    perm: torch.Tensor
    cuts: torch.Tensor


def make_twin(x: torch.Tensor, source: torch.Tensor, rng: random.Random) -> Twin:
    """x (B, T): a scored batch; source (1-D): real text to take the new futures from (already scored text, so
    that nothing the model has not been shown yet is shown early)."""
    B, T = x.shape
    perm = torch.tensor(rng.sample(range(B), B), dtype=torch.long)
    # a row's last position is compared only where nothing of the row changes (cut T-1): an eighth of the rows, so
    # that a model reading the next row at a row's end (its first token is the last position's target) is seen
    cuts = torch.tensor([T - 1 if rng.random() < 0.125 else rng.randrange(0, T - 1) for _ in range(B)],
                        dtype=torch.long)
    ids = x[perm].clone()
    for i in range(B):
        c = int(cuts[i])
        if c == T - 1:
            continue  # the whole row as scored, among other rows: batch independence at every position
        s = rng.randrange(0, max(1, source.numel() - T))
        ids[i, c + 1:] = source[s + c + 1: s + T]
        if ids[i, c + 1] == x[perm[i], c + 1]:  # the future must change right after the cut
            ids[i, c + 1] = (ids[i, c + 1] + 1 + rng.randrange(0, 255)) % max(2, int(source.max()) + 1)
    return Twin(ids, perm, cuts)


def twin_mismatch(logits: torch.Tensor, twin_logits: torch.Tensor, twin: Twin) -> Optional[tuple[int, int, float]]:
    """(scored row, cut, max |difference|) of the first row whose logits up to its cut differ bitwise; None if none."""
    for i in range(len(twin.perm)):
        r, c = int(twin.perm[i]), int(twin.cuts[i])
        a, b = logits[r, : c + 1], twin_logits[i, : c + 1]
        if not torch.equal(a, b):
            return r, c, float((a - b).abs().max()) if a.numel() else float("inf")
    return None


BATCH, TWIN, REPEAT, PROBE = "batch", "twin", "repeat", "probe"


class Request(NamedTuple):
    """One forward pass asked of a host: a scored batch (with its targets), a twin of one, a repeat of one, or a
    probe (the first input a host was asked, asked of the other host later)."""
    host: "Host"
    ids: torch.Tensor
    kind: str
    batch: int  # the scored batch it is, is a twin of, or repeats; for a probe, the batch it follows
    twin: Optional[Twin] = None  # for a batch with a twin, and the twin itself
    targets: Optional[torch.Tensor] = None
    after: int = -1  # a repeat: the batch it follows
    first_of: int = -1  # a host's first request: its logits are kept under this key; a probe: the key it asks again


class Audit:
    """Which scored batches get a twin and which are sent again later, chosen with the OS's randomness (secrets)
    when the pass starts, so no model can predict them; twins and repeats go to the other host.

    twin_share: the share of the batches of full-length rows that get a twin (at least min_twins); every row of a
    twin is checked at its own random position. repeats: batches scored again later in the pass (the last one at
    the end), by both hosts: the one that scored it (its state has moved on since) and the other (never shown it).
    probes: the first input each host was asked goes to the other host after two random batches and after the last,
    and must give bitwise the logits the first host gave at the start of the pass. The probe compares a host's model
    now with the other's at its first reply, so a change made at any time after the first reply (weights trained
    on the side, switched to by both hosts at once, which twins run side by side cannot see, before or after the
    repeated batches were first scored) is seen whenever it is in force at a probe; the last probe sees any change
    still in force at the end. Work done before the first reply is what the CPU bound (HOST_FACTOR) is for.
    So that a host cannot tell a probe by text it has seen (and answer it as it did at the start), the first two
    scored batches (one to each host, the hosts' first requests) get no twin, are not repeated and lend no text to
    a twin's future (passes of 4+ batches); a repeated batch has no twin either."""

    def __init__(self, plan: list, seq_len: int, rng: random.Random, twin_share: float = 0.125, min_twins: int = 4,
                 repeats: int = 2):
        n = len(plan)
        self.reserved = {0, 1} if n >= 4 else set()  # the probes' inputs: each host's first request
        full = [i for i, (_, _, length) in enumerate(plan) if length == seq_len and i not in self.reserved]
        k = min(len(full), max(min_twins, math.ceil(twin_share * len(full))))
        self.twins = set(rng.sample(full, k))
        plain = [i for i in range(n) if i not in self.reserved and i not in self.twins] or list(range(n))
        self.repeat_of: dict[int, list[int]] = {}  # batch index -> earlier batches to send again after it
        for j in rng.sample(plain, min(repeats, len(plain))):
            at = n - 1 if not self.repeat_of else rng.randrange(j, n)
            self.repeat_of.setdefault(at, []).append(j)
        self.kept = {j for js in self.repeat_of.values() for j in js}
        # per host key (0: the first host asked anything, 1: the other), the batches after which its first input is
        # asked of the other host: two at random, and the last
        self.probe_at = [sorted({rng.randrange(0, n), rng.randrange(0, n), n - 1}) for _ in range(2)]
        self.twin_rows = 0
        self.probes = 0

    def requests(self, plan: list, val: torch.Tensor, hosts: list, rng: random.Random) -> Iterator[Request]:
        """The pass's requests in the order they are sent: each scored batch on a host picked at random, its twin
        (if any) on the other host just before or after it, repeats of earlier batches on both hosts, and the
        probes: each host's first input asked of the other host."""
        firsts: list[tuple] = []  # (host, ids) of each host's first request, in the order the hosts got one
        due = [list(points) for points in self.probe_at]  # the probes not sent yet, per key

        def tagged(r: Request) -> Request:
            if len(hosts) > 1 and all(r.host is not h for h, _ in firsts):
                firsts.append((r.host, r.ids))
                return r._replace(first_of=len(firsts) - 1)
            return r

        lent_from = plan[1][0] + plan[1][1] * plan[1][2] if self.reserved else 0  # text a twin's future may use
        for i, (start, rows, length) in enumerate(plan):
            chunk = val[start: start + rows * length + 1]
            x, y = chunk[:-1].view(rows, length), chunk[1:].view(rows, length)
            host = rng.choice(hosts)
            if i == 1 and self.reserved and len(hosts) > 1:  # the second batch is the other host's first request
                host = next(h for h in hosts if h is not firsts[0][0])
            other = hosts[1 - hosts.index(host)] if len(hosts) > 1 else host
            twin = make_twin(x, val[lent_from: start + rows * length], rng) if i in self.twins else None
            first = twin is not None and rng.random() < 0.5  # the twin before or after its batch, at random
            if first:
                yield tagged(Request(other, twin.ids, TWIN, i, twin))
            yield tagged(Request(host, x, BATCH, i, twin, targets=y))
            if twin is not None and not first:
                yield tagged(Request(other, twin.ids, TWIN, i, twin))
            for j in self.repeat_of.get(i, []):
                s0, r0, l0 = plan[j]
                for again in rng.sample(hosts, len(hosts)):
                    yield tagged(Request(again, val[s0: s0 + r0 * l0].view(r0, l0), REPEAT, j, after=i))
            for key, points in enumerate(due):
                # due at or after a point once both hosts have had a request (else at the next batch that allows it)
                while len(firsts) == 2 and points and points[0] <= i:
                    points.pop(0)
                    ids = firsts[key][1]
                    yield Request(firsts[1 - key][0], ids, PROBE, i, first_of=key)


class Forked:
    """A forked child, with the three calls of Popen that Host uses."""

    def __init__(self, pid: int):
        self.pid, self.returncode = pid, None

    def poll(self) -> Optional[int]:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float) -> int:
        deadline = _now() + timeout
        while self.poll() is None:
            if _now() > deadline:
                raise TimeoutExpired("model host", timeout)
            time.sleep(0.01)
        return self.returncode

    def kill(self) -> None:
        try:
            os.kill(self.pid, 9)
        except ProcessLookupError:
            pass


def _widen(fd: int, size: int = 1 << 20) -> None:
    """Grow a pipe's buffer where the OS allows it (Linux: up to fs.pipe-max-size, 1 MB by default)."""
    try:
        import fcntl

        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, size)
    except (ImportError, AttributeError, OSError):
        pass


def _single_threaded() -> bool:
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:
        return False


class Host:
    """One model host process (src/harness/host.py) and its two pipes: ids go in, logits come out.

    Forked from the judge when it can be (Linux, one thread, before the judge has read its nonce or any data: the
    child holds the judge's imports and nothing else), which spares each host its own import of torch;
    otherwise started as `python -m src.harness.host`."""

    def __init__(self, name: str, cwd: Optional[Path] = None, env: Optional[dict] = None):
        self.name = name
        r1, w1 = os.pipe()  # judge -> host
        r2, w2 = os.pipe()  # host -> judge
        _widen(w2)  # a reply in 1-MB pieces, not 64 KB: fewer switches between the two processes
        try:
            if hasattr(os, "fork") and _single_threaded() and cwd is None and env is None:
                self.proc = self._fork(r1, w1, r2, w2)
            else:
                self.proc = Popen([sys.executable, "-m", "src.harness.host", "--req-fd", str(r1), "--rep-fd",
                                   str(w2)], cwd=cwd, env=env, pass_fds=(r1, w2), stdin=DEVNULL,
                                  stdout=sys.stderr.fileno(), stderr=sys.stderr.fileno())
        finally:
            os.close(r1)
            os.close(w2)
        self.req, self.rep = os.fdopen(w1, "wb"), os.fdopen(r2, "rb", buffering=0)
        self.vocab = 0
        self.budget: Optional[HostBudget] = None  # its CPU allowance (None: unbounded)
        self.research_cpu0: Optional[float] = None  # its CPU seconds when the research code's import began
        self.tokens = 0  # tokens asked of it so far
        self.pending = 0  # tokens of the request it is computing (0: idle)
        self.load_cpu_s: Optional[float] = None  # the research code's CPU seconds to build the model
        self.calls: list[tuple[int, float, bool]] = []  # per reply: (tokens, the host's CPU seconds when it was
        # read, whether its shape was new to the host)
        self.sent: list[tuple[int, int]] = []  # the shapes of the requests not yet received, oldest first
        self.shapes: set[tuple[int, int]] = set()  # the shapes asked of it so far
        self.fresh = False  # the request it is computing has a shape it had not been asked before
        self.wait_s = self.transfer_s = 0.0  # waiting for the model; reading its logits

    @staticmethod
    def _fork(r1: int, w1: int, r2: int, w2: int) -> Forked:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid:
            return Forked(pid)
        code = 1
        try:  # the host: stdin from /dev/null, stdout to the log, no descriptor of the judge's but its two pipes
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            os.dup2(2, 1)
            keep = sorted((r1, w2))
            os.closerange(3, keep[0])
            os.closerange(keep[0] + 1, keep[1])
            os.closerange(keep[1] + 1, 4096)
            from src.harness.host import main as host_main

            code = host_main(["--req-fd", str(r1), "--rep-fd", str(w2)])
        except BaseException:  # noqa: BLE001  (the child must never return into the judge's code)
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    def open(self, checkpoint: Path, threads: Optional[int]) -> str:
        """Have the host load the checkpoint, close its sandbox and build the model; its sandbox's description."""
        self.req.write((json.dumps({"checkpoint": str(checkpoint), "threads": threads}) + "\n").encode())
        self.req.flush()
        reply = self._line()
        if reply.get("stage") == "research":  # the host's CPU time up to here was the harness's
            own = self.cpu_s()
            said = float(reply.get("cpu_s") or 0.0)
            self.research_cpu0 = min(said, own) if own is not None else said
            reply = self._line()
        if reply.get("refused"):
            raise Tampered(f"the sandbox refused the model while it was built: {reply.get('error')}")
        if not reply.get("ok"):
            raise ModelFailed(f"the model did not load: {reply.get('error', 'the model host died')}")
        own = self.cpu_s()
        self.load_cpu_s = own - self.research_cpu0 if own is not None and self.research_cpu0 is not None else None
        self.vocab, self.threads = int(reply["vocab"]), reply.get("threads")
        return str(reply.get("sandbox", ""))

    def send(self, x: torch.Tensor) -> None:
        """Ask for the logits of x (B, T); receive() reads them. Requests queue in the pipe in order."""
        rows, length = x.shape
        self.req.write(HEADER.pack(rows, length) + x.to(torch.int64).contiguous().numpy().tobytes())
        self.req.flush()
        self.sent.append((rows, length))
        self.tokens += rows * length
        self.pending = rows * length
        self.fresh = (rows, length) not in self.shapes
        self.shapes.add((rows, length))

    def cpu_s(self) -> Optional[float]:
        """The host's CPU seconds so far (all its threads), as the kernel counts them; None off Linux."""
        return cpu_seconds(self.proc.pid)

    def allowed_s(self) -> Optional[float]:
        """The CPU seconds the reply it is computing may cost (HostBudget), or None when it is not bounded."""
        if self.budget is None or self.research_cpu0 is None:
            return None
        return self.budget.reply_s(self.pending, first=not self.calls, fresh=self.fresh)

    def check(self) -> None:
        """Tampered when the reply it is computing (the first with the model's construction) has cost more CPU than
        it is allowed: training or searching while scored."""
        allowed = self.allowed_s()
        if allowed is None:
            return
        used = self.cpu_s()
        if used is None:
            return
        since = used - (self.calls[-1][1] if self.calls else self.research_cpu0)
        if since > allowed:
            self.proc.kill()
            what = "building the model and its first reply" if not self.calls else f"its reply {len(self.calls) + 1}"
            factor = LATER_FACTOR if self.calls else HOST_FACTOR
            build = "the model" if not self.calls else ("the kernels of a new shape" if self.fresh else "")
            raise Tampered(f"model host {self.name} spent {since:.2f} CPU s on {what} ({self.pending:,} tokens), "
                           f"more than the {allowed:.2f} s allowed ({factor:g} x the "
                           f"{self.budget.per_token_s * 1e6:.2f} CPU us per token its training cost"
                           + (f", + {self.budget.load_s:.2f} s to build {build}" if build else "")
                           + "): a model computes its logits and nothing else while it is scored; work done here is "
                           "compute outside the run's budget")

    def call_costs(self) -> list[tuple[int, float, bool]]:
        """(tokens, CPU seconds, new shape) of each reply: the first one's CPU includes building the model."""
        out, before = [], self.research_cpu0
        for tokens, cpu, fresh in self.calls:
            out.append((tokens, cpu - before, fresh))
            before = cpu
        return out

    def check_calls(self, nominal_params: int) -> None:
        """Tampered when the first reply cost more than CALL_FACTOR x the host's median per token over the others
        (module comment): work before the first reply, for a model that wastes nothing on the others."""
        costs = self.call_costs()
        if len(costs) < MIN_CALLS:
            return
        rates = sorted(c / t for t, c, _ in costs[1:])
        median = rates[len(rates) // 2]
        tokens, cpu, _ = costs[0]
        allowed = CALL_FACTOR * median * tokens + CALL_SLACK_S + load_allowance(nominal_params)
        if cpu > allowed:
            raise Tampered(f"model host {self.name} spent {cpu:.2f} CPU s on building the model and its first reply "
                           f"({tokens:,} tokens), more than the {allowed:.2f} s allowed ({CALL_FACTOR:g} x its "
                           f"median {median * 1e6:.2f} CPU us per token over its other replies, + the model's "
                           "construction): a model computes its logits and nothing else while it is scored; work "
                           "done here is compute outside the run's budget")

    def await_reply(self) -> None:
        """Block until the host has something to say, checking its CPU allowance every 0.2 s meanwhile."""
        if self.budget is None:
            return
        fd = self.rep.fileno()
        while not select.select([fd], [], [], 0.2)[0]:
            self.check()
        self.check()

    def receive(self) -> torch.Tensor:
        """The logits of the oldest request not yet received."""
        rows, length = self.sent.pop(0)
        t0 = _now()
        self.await_reply()
        status = STATUS.unpack(self._exact(STATUS.size))[0]
        t1 = _now()
        self.wait_s += t1 - t0
        if status == BROKEN:
            raise Tampered(self._line().get("error", "the model broke the logits contract"))
        if status != 0:
            raise ModelFailed(self._line().get("error", "the model failed"))
        buf = self._exact(rows * length * self.vocab * 4)
        self.transfer_s += _now() - t1
        if self.research_cpu0 is not None and (cpu := self.cpu_s()) is not None:  # idle now: nothing more is sent yet
            self.calls.append((rows * length, cpu, self.fresh))
        self.pending = 0
        return torch.frombuffer(buf, dtype=torch.float32).view(rows, length, self.vocab)

    def _exact(self, n: int) -> bytearray:
        try:
            return read_exact(self.rep, n)
        except EOFError:
            raise ModelFailed(f"the model host {self.name} died (exit code {self.proc.poll()})") from None

    def _line(self) -> dict:
        self.await_reply()
        line = b""
        while not line.endswith(b"\n"):
            c = self.rep.read(1)
            if not c:
                break
            line += c
        try:
            return json.loads(line) if line.strip() else {}
        except ValueError:
            return {"error": f"the model host {self.name} wrote {line[:200]!r} instead of its reply"}

    def close(self) -> None:
        stop(self.proc, self.req, self.rep)


def replies(requests: list[Request], width: int) -> Iterator[tuple[Request, torch.Tensor]]:
    """(request, logits) for every request, in the order given, while up to `width` hosts compute at once.

    Each host gets its requests in the order given, one at a time: a request goes only to a host that has
    answered everything sent to it, so no write here can wait on a host that is itself waiting to write its
    reply (no deadlock, whatever the sizes). The next requests go out before a reply is handed back, so the
    hosts compute while the caller judges it; replies that come early wait here for their turn."""
    queues: dict[int, list[int]] = {}
    for k, r in enumerate(requests):
        queues.setdefault(id(r.host), []).append(k)
    busy: dict[int, int] = {}  # host -> the request it is computing
    done: dict[int, torch.Tensor] = {}
    nxt = 0

    def fill() -> None:
        idle = sorted((q[0], h) for h, q in queues.items() if q and h not in busy)
        for k, h in idle[: max(0, width - len(busy))]:
            requests[k].host.send(requests[k].ids)
            busy[h] = queues[h].pop(0)

    fill()
    while nxt < len(requests):
        if len(busy) == 1:
            h = next(iter(busy))
        else:  # whichever host answers first
            fds = {requests[k].host.rep.fileno(): (h, requests[k].host) for h, k in busy.items()}
            t0 = _now()
            while not (ready := select.select(list(fds), [], [], 0.2)[0]):
                for _, other in fds.values():  # none answered yet: are they computing logits, or more?
                    other.check()
            h, host = fds[ready[0]]
            host.wait_s += _now() - t0
        k = busy.pop(h)
        done[k] = requests[k].host.receive()
        fill()
        while nxt in done:
            yield requests[nxt], done.pop(nxt)
            nxt += 1


class ModelFailed(RuntimeError):
    """The research code failed on a batch (or its host died): a crash of the run, not a verdict on the checks."""


def score_checkpoint(path: Path, hosts: list[Host], log=sys.stderr, rng: Optional[random.Random] = None,
                     split: str = "val", spec: Optional[dict] = None, cost: Optional[dict] = None) -> dict:
    """Load the validation data, have the hosts build the model, score every window with the checks woven in;
    returns the result (status ok | tampered | nan). Raises Tampered, or ModelFailed when the model crashed.
    split="test": the held-out test split instead (same windows, same checks; `val_bpb` is then its figure).
    spec (score_client.eval_spec): the data set, row length, eval batch and threads to score with, from whoever
    started this process; the checkpoint's config (written after research code ran) only builds the model.
    cost (score_client.training_cost): what the run's training cost, from its starter; on a CPU slot it bounds the
    CPU time each host may spend (HostBudget), checked while the host computes."""
    from omegaconf import OmegaConf

    t0 = _now()
    rng = rng or random.SystemRandom()
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    cfg = to_object(OmegaConf.create(ckpt["config"]), TrainConfig)
    if spec:  # what the judge reads and how it cuts the windows: never what the research code may have edited
        cfg.data = to_object(OmegaConf.create(spec["data"]), DataConfig)
        cfg.model.sequence_len, cfg.eval_batch_tokens = int(spec["sequence_len"]), spec.get("eval_batch_tokens")
        cfg.device.threads = spec.get("threads")
    # The hosts share the run's slot (device.threads): on a CPU slot of 2+ threads both compute at once, each on
    # half of it (two one-thread forward passes side by side beat one two-thread pass: 0.89x the time, measured
    # here); this process judges a reply while the hosts compute the next, on one thread of its own.
    slot = (cfg.device.threads or torch.get_num_threads()) if ckpt["device"] == "cpu" else 1
    width = min(len(hosts), slot)
    torch.set_num_threads(1)
    data = load_prepared(cfg.data, splits=(split,))  # the judge alone reads it; the hosts cannot
    val, token_bytes = val_tokens(data, cfg.data.eval_tokens), torch.from_numpy(data.token_bytes)
    try:  # the nominal size of the config's model: what the checkpoint holds besides (a padding buffer) buys nothing
        params = model_facts(cfg.model, cfg.data.vocab_size).num_params
    except ValueError:
        params = 0
    budget = HostBudget.of(cost, params) if ckpt["device"] == "cpu" and cpu_seconds(os.getpid()) is not None else None
    for h in hosts:
        h.budget = budget
    sandbox = [h.open(path, max(1, slot // width) if ckpt["device"] == "cpu" else cfg.device.threads) for h in hosts]
    if any(h.vocab != cfg.data.vocab_size for h in hosts):
        raise Tampered(f"the model's vocabulary is not the data's ({cfg.data.vocab_size})")
    T = cfg.model.sequence_len
    eval_bs = max(1, (cfg.eval_batch_tokens or Runtime(device=torch.device(ckpt["device"]), dtype=torch.float32,
                                                         compile=False, peak_flops=0.0, name="").eval_batch_tokens) // T)
    t_load = _now()
    plan = windows(val.numel(), T, eval_bs)
    audit = Audit(plan, T, rng)
    total_nats, total_bytes, kept, waiting = 0.0, 0, {}, {}  # kept: for repeats; waiting: a twin's other half
    bar = tqdm(total=len(plan), desc="score", unit="batch", disable=not (hasattr(log, "isatty") and log.isatty()),
               leave=False)
    firsts: dict[int, torch.Tensor] = {}  # each host's first logits, for the probes
    for cur, logits in replies(list(audit.requests(plan, val, hosts, rng)), width):
        i = cur.batch
        if cur.kind == PROBE:
            ref = firsts[cur.first_of]
            if not torch.equal(logits, ref):
                asked = next(h.name for h in hosts if h is not cur.host)
                raise Tampered(f"no change while scored: the first input model host {asked} was asked, asked of "
                               f"model host {cur.host.name} after "
                               f"scored batch {i + 1} of {len(plan)}, gave logits that differ by "
                               f"{float((logits - ref).abs().max()):.3g} from the first host's at the start of the "
                               "pass; a model's logits are a fixed function of its input while it is scored (a model "
                               "that changes its weights after its first replies is seen here)")
            audit.probes += 1
            continue
        if cur.first_of >= 0:
            firsts[cur.first_of] = logits
        if cur.kind == REPEAT:
            if not torch.equal(logits, kept[i]):
                raise Tampered(f"no state across calls: scored batch {i + 1}, sent again after batch {cur.after + 1}, "
                               f"gave logits that differ by {float((logits - kept[i]).abs().max()):.3g}; the model "
                               "must not remember or adapt to earlier inputs")
        elif cur.twin is not None and i not in waiting:  # the first half of a twin pair: wait for the other
            waiting[i] = logits
        elif cur.twin is not None:
            other = waiting.pop(i)
            scored, twin_logits = (logits, other) if cur.kind == BATCH else (other, logits)
            bad = twin_mismatch(scored, twin_logits, cur.twin)
            if bad:
                r, c, d = bad
                raise Tampered(f"causality and batch independence, checked on scored batch {i + 1} of {len(plan)}: "
                               f"row {r}'s logits at positions <= {c} changed by {d:.3g} when the tokens after "
                               f"position {c} and the other rows of the batch changed (a twin of the batch, run by "
                               "the other model process); a causal model scores each row from its own earlier "
                               "tokens only, and the same input gives the same logits bitwise")
            audit.twin_rows += scored.shape[0]
        if cur.kind == BATCH:
            nb = token_bytes[cur.targets]
            total_nats += float((token_nats(logits, cur.targets) * (nb > 0)).sum())
            total_bytes += int(nb.sum())
            if i in audit.kept:
                kept[i] = logits
            bar.update(1)
    bar.close()
    for h in hosts:  # the whole pass within the allowance, the last reply included; no reply far dearer than most
        h.check()
        if ckpt["device"] == "cpu":
            h.check_calls(params)
    bpb = bpb_from_sums(total_nats, total_bytes)
    if not math.isfinite(bpb):
        return {"status": NAN, "val_bpb": float("nan"), "reason": "val_bpb is not finite"}
    floor = cfg.data.bpb_floor
    if floor is not None and bpb < floor:
        raise Tampered(f"val_bpb {bpb:.4f} is below the floor {floor} of this data set (data.bpb_floor): no model "
                       "of this size can reach it honestly, so the score is refused")
    t_end = _now()
    return {"status": OK, "val_bpb": bpb, "split": split, "reason": "", "device": ckpt["device"], "dtype": ckpt["dtype"],
            "threads": (hosts[0].threads or 1) * width if ckpt["device"] == "cpu" else None,  # the hosts' at once
            "checks": {"batches": len(plan), "twins": len(audit.twins), "twin_rows": audit.twin_rows,
                       "repeats": sum(map(len, audit.repeat_of.values())) * len(hosts), "probes": audit.probes,
                       "sandbox": sandbox[0],
                       "hosts": host_figures(hosts)},
            "seconds": {"load": t_load - t0, "score": t_end - t_load, "wait": sum(h.wait_s for h in hosts),
                        "transfer": sum(h.transfer_s for h in hosts)}}


def median_rate(h: Host) -> Optional[float]:
    rates = sorted(c / t * 1e6 for t, c, _ in h.call_costs()[1:])
    return rates[len(rates) // 2] if rates else None


def max_reply_share(h: Host) -> Optional[float]:
    """The largest share of its allowance any reply of the host used (None when unbounded)."""
    if h.budget is None or not h.calls:
        return None
    return max(c / h.budget.reply_s(t, first=i == 0, fresh=f) for i, (t, c, f) in enumerate(h.call_costs()))


def host_figures(hosts: list[Host]) -> dict:
    """Per host: tokens asked of it, the research code's CPU seconds (building the model + the pass) and what it was
    allowed (None when unbounded or off Linux)."""
    used = [(h.cpu_s() - h.research_cpu0) if h.cpu_s() is not None and h.research_cpu0 is not None else None
            for h in hosts]
    firsts = [(h.call_costs()[0][1] if h.calls else None) for h in hosts]
    return {"tokens": [h.tokens for h in hosts], "research_cpu_s": used, "load_cpu_s": [h.load_cpu_s for h in hosts],
            "first_call_cpu_s": firsts, "median_call_us_per_token": [median_rate(h) for h in hosts],
            "max_reply_over_allowed": [max_reply_share(h) for h in hosts],
            "allowed_us_per_token": ([HOST_FACTOR * hosts[0].budget.per_token_s * 1e6,  # the first reply, the others
                                      LATER_FACTOR * hosts[0].budget.per_token_s * 1e6] if hosts[0].budget else None)}


def main() -> int:
    split = os.environ.get(SPLIT_ENV, "val")  # fixed by whoever started this process, before any research code
    if split not in ("val", "test"):
        split = "val"
    hosts = [Host("A"), Host("B")]  # before the nonce is read: a forked host holds nothing of the judge's
    nonce = sys.stdin.readline().strip()
    try:  # how to score, from whoever started this process (score_client.eval_spec); null: the checkpoint says
        spec = json.loads(sys.stdin.readline() or "null")
    except ValueError:
        spec = None
    out = sys.stdout
    out.write(f"{READY}\n")
    out.flush()
    path = sys.stdin.readline().strip()
    if not path:
        for h in hosts:
            h.close()
        return 0
    try:  # what the run's training cost (score_client.training_cost); null or missing: the hosts are not bounded
        cost = json.loads(sys.stdin.readline() or "null")
    except ValueError:
        cost = None
    t0 = _now()
    try:
        result = score_checkpoint(Path(path), hosts, split=split, spec=spec if isinstance(spec, dict) else None,
                                  cost=cost if isinstance(cost, dict) else None)
    except Tampered as e:
        result = {"status": TAMPERED, "val_bpb": float("nan"), "reason": str(e)}
    except Exception as e:  # the research code crashed while being loaded or run, or a host died
        import traceback

        traceback.print_exc(file=sys.stderr)
        result = {"status": CRASH, "val_bpb": float("nan"), "reason": f"scoring failed: {type(e).__name__}: {e}"}
    finally:
        for h in hosts:
            h.close()
    result.update(nonce=nonce, total_seconds=_now() - t0)
    out.write(f"\n{MARKER} {json.dumps(result)}\n")
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
