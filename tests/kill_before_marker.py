"""Run a training script in one process and SIGKILL it once `step_N` is written, before its COMPLETE marker.

    python tests/kill_before_marker.py step_8 train_ddp.py --config-name L0_sanity ...

Test-only fault injection for tests/test_faults.py: the recipe has no hook for it. This patches
`checkpointing.format.mark_complete`, which the checkpointer calls once every rank has written its part.
"""

import os
import runpy
import signal
import sys
from pathlib import Path

RECIPE_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(RECIPE_DIR))

import checkpointing.format as step_files  # noqa: E402


def main() -> None:
    """Patch the marker write, then run the script as `python <script> <args>` would."""
    folder, script, *args = sys.argv[1:]
    mark_complete = step_files.mark_complete

    def killed_before_the_marker(path, run_info):
        if Path(path).name == folder:
            os.kill(os.getpid(), signal.SIGKILL)
        mark_complete(path, run_info)

    step_files.mark_complete = killed_before_the_marker
    sys.argv = [script, *args]
    runpy.run_path(str(RECIPE_DIR / script), run_name="__main__")


if __name__ == "__main__":
    main()
