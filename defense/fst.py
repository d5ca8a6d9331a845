"""Feature Shift Tuning (Min, Qin, Shen, Cheng, NeurIPS 2023, arXiv 2310.01875): re-initialise the linear head,
tune the whole network on a little clean data, and push the new head away from the backdoored one with the
penalty alpha * <w, w_ori> while its norm stays at ||w_ori||_F. The algorithm lives in defense/ft.py (all five
tuning modes share one loop); this entry point is that code with ft_mode fixed to fst.

    python defense/fst.py --result_file badnet_demo

Settings: config/defense/ft/<dataset>.yaml; output: record/<attack record>/defense/fst/.
"""


from defense import ft
from utils.errors import run_main
from utils.registry import register


@register("fst", "defense", paper="Min et al., NeurIPS 2023", needs=("trained_model", "clean_subset"), options=ft.OPTIONS,
          summary="Feature Shift Tuning: re-initialised head pushed away from the backdoored one while tuning")
def configure(argv=None, dataset=None):
    return ft.configure(argv, dataset, fixed_mode="fst", description=__doc__)


def main(argv=None):
    return ft.main(argv, fixed_mode="fst", description=__doc__)


if __name__ == "__main__":
    run_main(main)
