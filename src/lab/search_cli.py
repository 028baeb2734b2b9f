"""The research loop's command line, behind python -m src.search (the loop itself is src/lab/loop.py).

Usage: python -m src.search agent=tpe device=cpu budget.seconds=30 search.max_experiments=10
       python -m src.search search.tag=nov26 search.resume=true
"""
from __future__ import annotations

import logging
import signal
import sys

import hydra
from hydra.core.hydra_config import HydraConfig

from src.harness.config import to_object
from src.lab.agents import AgentStop
from src.lab.config import SearchAppConfig, register_search_configs
from src.lab.heldout import describe
from src.lab.loop import run, train_overrides
from src.lab.session import SessionError
from src.harness.paths import REPO

log = logging.getLogger("src.search")


def local_ui_hint(uri) -> str:
    """How to serve a local store before opening the link (a tracking server needs nothing)."""
    if not uri or str(uri).startswith(("http://", "https://")):
        return ""
    return f"  (serve the store first: mlflow ui --backend-store-uri {uri})"


def _sigterm(signum, frame):
    raise KeyboardInterrupt


@hydra.main(version_base="1.3", config_path=str(REPO / "conf"), config_name="search")
def main(dcfg) -> None:
    cfg = to_object(dcfg, SearchAppConfig)
    task = list(HydraConfig.get().overrides.task)
    signal.signal(signal.SIGTERM, _sigterm)
    try:
        out = run(cfg, train_overrides(task), cli=task)  # cli: what a resume takes as given again
    except (SessionError, AgentStop) as e:
        log.error("%s", e)
        sys.exit(2)
    except ValueError as e:  # a malformed search space, replay file or agent option
        log.debug("details", exc_info=True)
        log.error("%s", e)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    print(f"session {out['tag']}: best val_bpb {out['best_val_bpb']:.6f} ({out['best_exp']}, commit "
          f"{out['best_commit'][:7]}) on branch {out['branch']}; {out['stop_reason']}\n"
          f"verdicts: {out['verdicts']}\n"
          + (f"held out: {describe(out['heldout'])}\n" if out.get("heldout") else "")
          + (f"MLflow: {out['mlflow_link']}{local_ui_hint(out.get('mlflow_uri'))}\n" if out.get("mlflow_link") else "")
          + f"report: python -m src.report {out['tag']}", flush=True)


def cli() -> None:
    """python -m src.search: register the schemas, compose conf/search.yaml, run the session."""
    register_search_configs()
    main()
