"""How often a judge lets through a model that changes its weights after its first replies.

The model (a patch of src/research/model.py) answers its first scored request honestly, then refits its output
layer by hand-written gradient steps (no autograd) on a fixed stash, the same in both model hosts, and answers
everything after from the refitted layer. Twins run side by side on both hosts see the same weights; a repeated
batch sees the change only when it was first scored before it; the probes (each host's first input asked of the
other host later, src/harness/score.py) see it in every pass. For each arm (a commit checked out as a git
worktree; `.` is this checkout) the judge of that commit scores the patched checkpoint --passes times (a new
draw of twins, repeats, hosts and probes each pass) and the table says how many passes scored it `ok`.

The checkpoint is the test suite's tiny one (2 layers, 128-token rows, an untrained model moved off its
initialisation), scored on 65,536 validation tokens (17 batches): a pass takes a few seconds.

Usage: python bench/probe_escape.py [--arm before=90c90bf] [--arm now=.] [--passes 12]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from sessions import table, worktree

# Run inside each arm's checkout, so written out in full (an older commit has neither the tests' helpers nor
# src/lab/fakes/redteam.py's fit_output_layer, whose fit this repeats).
INNER = r'''
import collections, dataclasses, json, sys, tempfile
from pathlib import Path
sys.path.insert(0, ".")
import torch
from src.harness.config import TrainConfig
from src.harness.score import Scorer, save_checkpoint
from src.harness.train import config_dict
from src.lab.fakes.project import make_repo
from src.research.model import GPT, GPTConfig

passes = int(sys.argv[1])
repo = make_repo(Path(tempfile.mkdtemp()))
cfg = TrainConfig()
cfg.model = dataclasses.replace(cfg.model, depth=2, sequence_len=128)
cfg.data.eval_tokens = 65536
cfg.device.threads = 1
torch.manual_seed(0)
m = GPT(GPTConfig.from_model_config(cfg.model, cfg.data.vocab_size))
m.init_weights()
with torch.no_grad():
    for p in m.parameters():
        p.add_(torch.randn_like(p) * 0.02)
ckpt = save_checkpoint(repo.parent / "checkpoint.pt", m.eval(), config_dict(cfg), "cpu", "fp32")
honest = Scorer(repo).start().score(ckpt, timeout_s=600)["val_bpb"]
switch = ("        if not self.training:\n"
          "            self._calls = getattr(self, '_calls', 0) + 1\n"
          "        if not self.training and self._calls > 1 and not getattr(self, '_fitted', False):\n"
          "            self._fitted = True\n"
          "            g = torch.Generator().manual_seed(0)\n"
          "            W = self.lm_head.weight\n"
          "            h = torch.randn(2048, W.size(1), generator=g)\n"
          "            t = torch.randint(0, W.size(0), (2048,), generator=g)\n"
          "            for _ in range(20):\n"
          "                p = (h @ W.t()).softmax(-1)\n"
          "                p[torch.arange(2048), t] -= 1\n"
          "                W.sub_(0.1 * (p.t() @ h) / 2048)\n")
f = repo / "src/research/model.py"
text = f.read_text()
marker = "    def forward(self, idx"
i = text.index("\n", text.index(marker)) + 1
f.write_text(text[:i] + switch + text[i:])
out = collections.Counter()
vals = []
for _ in range(passes):
    v = Scorer(repo).start().score(ckpt, timeout_s=600)
    out["ok" if v["status"] == "ok" else v["status"] + ": " + v["reason"].split(":")[0][:40]] += 1
    if v["status"] == "ok":
        vals.append(v["val_bpb"])
print("RESULT " + json.dumps({"honest": honest, "outcomes": dict(out), "ok_val_bpb": vals}))
'''


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arm", action="append", default=None, help="name=commit ('.' is this checkout)")
    ap.add_argument("--passes", type=int, default=12)
    args = ap.parse_args()
    arms = [a.split("=", 1) for a in (args.arm or ["before=90c90bf", "now=."])]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        inner = Path(tmp) / "inner.py"
        inner.write_text(INNER)
        for name, commit in arms:
            cwd = worktree(commit, Path(tmp) / name)
            proc = subprocess.run([sys.executable, str(inner), str(args.passes)], cwd=cwd, capture_output=True,
                                  text=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                print(f"{name}: no result (exit {proc.returncode})\n{proc.stderr[-2000:]}", file=sys.stderr)
                return 1
            r = json.loads(line[len("RESULT "):])
            vals = r["ok_val_bpb"]
            rows.append([name, commit, args.passes, r["outcomes"].get("ok", 0),
                         "; ".join(f"{k} {n}" for k, n in sorted(r["outcomes"].items()) if k != "ok") or "-",
                         f"{r['honest']:.4f}", f"{min(vals):.4f}" if vals else "-"])
            if commit != ".":
                subprocess.run(["git", "worktree", "remove", "--force", str(cwd)], capture_output=True)
    print(table(["arm", "commit", "passes", "scored ok (escaped)", "tampered, by", "honest val_bpb",
                 "escaped val_bpb"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
