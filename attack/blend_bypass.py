"""Bypass with the Blended trigger, under the name the original repository uses (attack/blend_bypass.py).
A thin entry point: the same code and options as `python attack/bypass.py --trigger blend` (see attack/bypass.py).

    python attack/blend_bypass.py --save_folder_name bypass_blend_demo
"""
from attack import bypass
from utils.errors import run_main


def configure(argv=None):
    return bypass.configure(argv, trigger="blend")


def main(argv=None):
    return bypass.main(argv, trigger="blend")


if __name__ == "__main__":
    run_main(main)
