"""Blended (Chen et al., arXiv 1712.05526): blend a pattern into a fraction of the training images,
x' = (1 - alpha) x + alpha P, and relabel them to the target. Default pattern: seeded uniform noise
(the paper's random-pattern variant; conventions §6.2, docs/specs/conventions.md). The pattern is shared with
Bypass, so it lives in utils/trigger_options.py; training is the standard recipe.

    python attack/blend.py --save_folder_name blend_demo
"""
from utils.attack import attack_config, run_attack
from utils.errors import run_main
from utils.registry import register
from utils.trigger_options import BLEND_OPTIONS, make_blend_trigger

OPTIONS = BLEND_OPTIONS


@register("blend", "attack", paper="Chen et al., arXiv 1712.05526", needs=("dataset",), options=OPTIONS,
          summary="Blended: x' = 0.8 x + 0.2 P, P seeded uniform noise (or any image)")
def configure(argv=None):
    """Every setting resolved and checked and the trigger made, nothing written (the sweep checks its jobs with this)."""
    cfg, args = attack_config("blend", OPTIONS, argv, __doc__)
    return cfg, args, *make_blend_trigger(cfg)


def main(argv=None):
    cfg, args, trigger, meta = configure(argv)
    return run_attack("blend", cfg, args, trigger, meta)


if __name__ == "__main__":
    run_main(main)
