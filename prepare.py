"""Prepare a data set once (tokenizer, token shards, manifest): the entry into src/harness/prepare.py.

Usage: python prepare.py [data=shakespeare|text|climbmix|tinystories] [data.key=value ...]
"""
import hydra

from src.harness.prepare import main as prepare_main, register_prepare_configs

register_prepare_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="prepare")
def main(cfg) -> None:
    prepare_main(cfg)


if __name__ == "__main__":
    main()
