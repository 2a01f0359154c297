"""``python -m scripts.plan model=<preset> cluster.gpus=N cluster.gpus_per_node=G
cluster.gpu=<h100_80gb|h200|b200|a100_80gb|cpu> [trainer.* / any training override]
[plan.layout="tp=2 pp=8 ep=8 ..."]`` (also ``moefold-plan``).

The same Hydra config tree as training. Prints the best folded layouts (or explains the
one in ``plan.layout``) and writes ``<run_dir>/plan.json`` (docs/planner.md). Exit 2 with
one line when the config is invalid or the model fits no layout.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from trainer.config import register_configs
from trainer.errors import UserError, report_user_error

register_configs()


def run(cfg: DictConfig) -> dict:
    from trainer.planner import plan_from_config, table

    world = cfg.cluster.gpus or cfg.parallel.world_size
    if not world:
        raise UserError("cluster.gpus=N is required (the number of GPUs to plan for)")
    result = plan_from_config(cfg, world)
    print(table(result))
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "plan.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {run_dir / 'plan.json'}")
    if result.get("error"):
        raise UserError(result["error"])
    return result


@hydra.main(version_base=None, config_path="../configs", config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except UserError as e:
        report_user_error(e)
        sys.exit(2)


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
