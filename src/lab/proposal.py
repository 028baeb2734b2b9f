"""A research proposal (description, hypothesis, Hydra overrides, optional code patch) and its checks.

Every agent speaks `Proposal`. Before anything runs, a proposal is checked: its overrides must
parse, stay inside the editable config roots, leave the seed and the session's own command-line
keys alone and compose against the train schemas; its patch must touch only the editable files
(and, checked by the session, apply to the best commit). A failed check raises `InvalidProposal`
whose message is recorded in the ledger and given back to the agent.

Usage: p = Proposal.from_dict({...}); ovs = check_overrides(p.overrides, roots, pinned);
       paths = check_patch_paths(p.patch, editable); cfg = compose_train(conf_dir, overrides)
"""
from __future__ import annotations

import copy
import fnmatch
import hashlib
import re
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf

COMPOSE_LOCK = threading.RLock()  # Hydra's global state: one composition at a time

KINDS = ("overrides", "patch", "patch+overrides")


class InvalidProposal(ValueError):
    """A proposal that must not run; the message says what was wrong and what is accepted."""


@dataclass
class Proposal:
    description: str  # one line: what changes
    hypothesis: str = ""  # why it should lower val_bpb
    overrides: list[str] = field(default_factory=list)  # Hydra key=value (or group=option), relative to the best
    patch: Optional[str] = None  # unified diff against the best commit, touching only editable files
    meta: dict = field(default_factory=dict)  # agent-private data that must survive a resume (TPE params, ...)
    # instead of a new change: an earlier near miss (exp-NNN) to run again in (best, candidate) pairs; the lab fills
    # in its change (src/lab/retest.py)
    retest: str = ""

    @property
    def kind(self) -> str:
        if self.patch and self.overrides:
            return "patch+overrides"
        return "patch" if self.patch else "overrides"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> "Proposal":
        """Build from a plain dict (a replay file entry, an LLM tool call), with errors an author can act on."""
        if not isinstance(d, dict):
            raise InvalidProposal(f"a proposal must be a mapping with description/hypothesis/overrides/patch; got {d!r:.200}")
        unknown = set(d) - {"description", "hypothesis", "overrides", "patch", "meta", "retest"}
        if unknown:
            raise InvalidProposal(f"unknown proposal field(s) {sorted(unknown)}; expected description, hypothesis, "
                                  "overrides (list of key=value), patch (unified diff), or retest (exp-NNN)")
        ovs = d.get("overrides") or []
        if isinstance(ovs, str):
            ovs = ovs.split()
        if not isinstance(ovs, list) or not all(isinstance(o, (str, int, float)) for o in ovs):
            raise InvalidProposal(f"overrides must be a list of 'key=value' strings; got {ovs!r:.200}")
        patch = d.get("patch") or None
        if patch is not None and not isinstance(patch, str):
            raise InvalidProposal("patch must be a unified diff as one string")
        retest = str(d.get("retest") or "").strip()  # the lab fills in the change of the experiment it names
        desc = str(d.get("description") or "").strip()
        if not desc:
            desc = f"retest of {retest}" if retest else " ".join(str(o) for o in ovs) or "code patch"
        return cls(description=desc, hypothesis=str(d.get("hypothesis") or "").strip(),
                   overrides=[str(o) for o in ovs], patch=patch, meta=dict(d.get("meta") or {}), retest=retest)


# ---------------------------------------------------------------------------- overrides


def _parser():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create()


def override_key(line: str) -> str:
    """The key (or group) an override sets: 'optimizer.matrix_lr=0.05' -> 'optimizer.matrix_lr'."""
    [ov] = _parser().parse_overrides([line])
    return ov.key_or_group


def parse_overrides(lines: list[str]) -> list:
    """Parse a proposal's Hydra overrides, refusing interpolations, sweeps, deletions and additions.

    A proposal sets existing keys to literal values: `${oc.env:NAME}` would be resolved in the search process
    (which holds the unstripped environment) and the resolved config shown to the agent. The user's own
    command-line overrides never come through here (src/lab/loop.py train_overrides)."""
    from hydra.errors import OverrideParseException

    out = []
    for line in lines:
        if "${" in line:  # resolved in the search process, whose environment is not stripped
            raise InvalidProposal(f"override {line!r} holds a ${{...}} interpolation or resolver (oc.env, now, "
                                  "hydra, ...): a proposal sets literal values; write the value itself")
        try:
            [ov] = _parser().parse_overrides([line])
        except OverrideParseException as e:
            raise InvalidProposal(f"override {line!r} does not parse: {str(e).splitlines()[0]}; "
                                  "expected key=value, e.g. optimizer.matrix_lr=0.05") from None
        if ov.is_sweep_override():
            raise InvalidProposal(f"override {line!r} is a sweep; a proposal sets one value per key")
        if ov.is_add() or ov.is_force_add() or ov.is_delete():
            raise InvalidProposal(f"override {line!r} adds or deletes a key; a proposal may only change "
                                  "existing keys (key=value or group=option)")
        out.append(ov)
    return out


def merge_overrides(base: list[str], new: list[str]) -> list[str]:
    """`new` applied on top of `base`: a key set in both takes the new value and the base's position."""
    keys = {override_key(o): o for o in base}
    for o in new:
        keys[override_key(o)] = o
    return list(keys.values())


def check_overrides(lines: list[str], roots: list[str], pinned: list[str] = ()) -> list:
    """Parse and check a proposal's overrides; returns the parsed overrides or raises InvalidProposal.

    roots: top-level keys a proposal may set (model, optimizer, batch). pinned: keys the session's
    command line fixed (device.type, budget.seconds, ...), which no proposal may change.
    """
    ovs = parse_overrides(lines)
    seen: dict[str, str] = {}
    for ov in ovs:
        key = ov.key_or_group
        if key in seen:
            raise InvalidProposal(f"{key} is set twice ({seen[key]!r} and {ov.input_line!r}); set it once")
        seen[key] = ov.input_line
        if key == "seed" or key.endswith(".seed"):
            raise InvalidProposal(f"{ov.input_line!r} changes the random seed: the seed is fixed for the session, "
                                  "a different seed is noise, not a finding. Propose a change to the model or optimizer")
        root = key.split(".")[0].split("@")[0]
        if root not in roots:
            raise InvalidProposal(f"{ov.input_line!r} sets {root!r}, which is outside the research surface; a proposal "
                                  f"may override only {', '.join(roots)} (the harness: budget, data, device, tracking, "
                                  "seed, is fixed)")
        if key in pinned:
            raise InvalidProposal(f"{key} is fixed by the session's command line; start a session without it "
                                  "to search over it")
    return ovs


# ---------------------------------------------------------------------------- patches

_DIFF_PATHS = re.compile(r"^(?:diff --git a/(\S+) b/(\S+)|--- (?:a/)?(\S+)|\+\+\+ (?:b/)?(\S+)|"
                         r"rename from (\S+)|rename to (\S+)|copy from (\S+)|copy to (\S+))", re.M)


def patch_paths(patch: str) -> list[str]:
    """Every path a unified diff names (old and new sides, renames, copies), /dev/null excluded."""
    paths = []
    for m in _DIFF_PATHS.finditer(patch):
        for p in m.groups():
            if p and p != "/dev/null" and p not in paths:
                paths.append(p.split("\t")[0])
    return paths


def check_patch_paths(patch: str, editable: list[str]) -> list[str]:
    """The paths a patch touches, if all are editable; else InvalidProposal naming the protected ones."""
    if not patch.strip():
        raise InvalidProposal("the patch is empty")
    paths = patch_paths(patch)
    if not paths:
        raise InvalidProposal("the patch names no file; expected a unified diff with '--- a/<path>' and "
                              "'+++ b/<path>' headers (git diff format)")
    bad = [p for p in paths if not any(fnmatch.fnmatch(p, pat) for pat in editable)]
    if bad:
        raise InvalidProposal(f"the patch touches {', '.join(bad)}, outside the editable files "
                              f"({', '.join(editable)}); the harness (data, evaluation, budget, tracking) is fixed")
    return paths


# ---------------------------------------------------------------------------- composing


def compose_train(conf_dir: Path, overrides: list[str]):
    """Compose conf/train.yaml with `overrides` into a typed TrainConfig, or raise InvalidProposal.

    Works inside a running Hydra app too: the global Hydra state is set aside and restored. Hydra's state
    is global, so compositions are serialized (search.workers > 1 composes from several threads).
    """
    key = (_conf_fingerprint(conf_dir), tuple(overrides))  # the files' contents: a kept preset changes it
    with COMPOSE_LOCK:
        if key not in _COMPOSED:
            if len(_COMPOSED) >= 256:
                _COMPOSED.clear()
            _COMPOSED[key] = _compose_train(conf_dir, overrides)
        return copy.deepcopy(_COMPOSED[key])  # Hydra's compose costs ~0.2 s a call; a session repeats many


_COMPOSED: dict = {}


def _conf_fingerprint(conf_dir: Path) -> str:
    """A digest of every file under conf_dir (paths and contents)."""
    h = hashlib.sha256()
    root = Path(conf_dir).resolve()
    for f in sorted(root.rglob("*")):
        if f.is_file():
            h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return str(root) + ":" + h.hexdigest()


def _compose_train(conf_dir: Path, overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.singleton import Singleton

    from src.harness.config import register_configs, to_object

    register_configs()
    saved = Singleton._instances.pop(GlobalHydra, None)  # a running app's Hydra, put back below
    try:
        with initialize_config_dir(config_dir=str(Path(conf_dir).resolve()), version_base="1.3"):
            dcfg = compose(config_name="train", overrides=list(overrides))
        return to_object(dcfg)
    except Exception as e:  # Hydra/OmegaConf errors: unknown key, wrong type, missing option
        raise InvalidProposal(f"the overrides do not compose against the config schemas: {_compose_error(e)}. "
                              "Use keys and options that exist in src/harness/config.py and conf/<group>/") from None
    finally:
        if saved is not None:
            Singleton._instances[GlobalHydra] = saved
        else:
            Singleton._instances.pop(GlobalHydra, None)


def _compose_error(e: Exception) -> str:
    """Hydra's message without its 'use +key' advice (a proposal may not add keys) and the search path."""
    msg = str(e).split("Config search path:")[0]
    msg = re.sub(r"\n?To append to your config use \+\S+", "", msg)
    if e.__cause__ is not None:
        cause = str(e.__cause__).splitlines()[0]
        msg = f"{msg.strip()} ({cause})"
    return " ".join(msg.split())[:600]


def get_dotted(obj: Any, key: str) -> Any:
    """Read `optimizer.matrix_lr` from a typed config (dataclasses all the way down)."""
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def preset_yaml(overrides: list[str], groups: set[str], header: str) -> str:
    """An overrides-only experiment preset (`# @package _global_`) holding `overrides`.

    groups: the config group names (model, optimizer, ...): `optimizer=adamw` becomes a defaults
    override, key=value lines become nested values.
    """
    defaults, values = [], OmegaConf.create({})
    for ov in parse_overrides(overrides):
        key = ov.key_or_group
        if key in groups:
            defaults.append({f"override /{key}": ov.value()})
        else:
            OmegaConf.update(values, key, ov.value(), force_add=True)
    body = {}
    if defaults:
        body["defaults"] = defaults + ["_self_"]
    body.update(OmegaConf.to_container(values))
    text = OmegaConf.to_yaml(OmegaConf.create(body)) if body else "{}\n"
    lines = [f"# {h}" if h else "#" for h in header.splitlines()]
    return "# @package _global_\n" + "\n".join(lines) + "\n" + text
