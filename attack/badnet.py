"""BadNets (Gu et al., arXiv 1708.06733): stamp a small patch on a fraction of the training images and relabel
them to the target; the trained model obeys the patch. Conventions §6.1, §7, §11 (docs/specs/conventions.md).
The patch (a 3 x 3 white square at the bottom-right corner by default, or any image) is shared with Bypass, so it
lives in utils/trigger_options.py; training is the standard recipe.

    python attack/badnet.py --save_folder_name badnet_demo
"""
from utils.attack import attack_config, run_attack
from utils.errors import run_main
from utils.registry import register
from utils.trigger_options import PATCH_OPTIONS, make_patch_trigger

OPTIONS = PATCH_OPTIONS


@register("badnet", "attack", paper="Gu et al., arXiv 1708.06733", needs=("dataset",), options=OPTIONS,
          summary="BadNets: a 3×3 white patch at the bottom-right corner")
def configure(argv=None):
    """Every setting resolved and checked and the trigger made, nothing written (the sweep checks its jobs with this)."""
    cfg, args = attack_config("badnet", OPTIONS, argv, __doc__)
    return cfg, args, *make_patch_trigger(cfg)


def main(argv=None):
    cfg, args, trigger, meta = configure(argv)
    return run_attack("badnet", cfg, args, trigger, meta)


if __name__ == "__main__":
    run_main(main)
