"""Bypass with the BadNets trigger, under the name the original repository uses (attack/badnet_bypass.py).
A thin entry point: the same code and options as `python attack/bypass.py --trigger badnet` (see attack/bypass.py).

    python attack/badnet_bypass.py --save_folder_name bypass_badnet_demo
"""
from attack import bypass
from utils.errors import run_main


def configure(argv=None):
    return bypass.configure(argv, trigger="badnet")


def main(argv=None):
    return bypass.main(argv, trigger="badnet")


if __name__ == "__main__":
    run_main(main)
