"""Scores one folder of mp4s with VBench; runs inside the Python environment that has ``vbench``.

It imports nothing from dit-sparse, so any interpreter with ``vbench`` installed can run it by path.
It reads a JSON job on stdin::

    {"videos": "/out/videos/dense", "prompts": {"0.mp4": "a red fox"}, "dimensions": ["temporal_flickering"],
     "device": "cuda", "work_dir": "/out/vbench", "name": "dense"}

and leaves VBench's own ``<work_dir>/<name>_eval_results.json``. ``local=True`` makes VBench load
its weights from ``VBENCH_CACHE_DIR``; the caller checks that they are there first.
"""

import json
import os
import sys


def main() -> None:
    import vbench
    from vbench import VBench

    job = json.load(sys.stdin)
    full_info = os.path.join(os.path.dirname(vbench.__file__), "VBench_full_info.json")
    bench = VBench(job["device"], full_info, job["work_dir"])
    bench.evaluate(
        videos_path=job["videos"],
        name=job["name"],
        prompt_list=job["prompts"],
        dimension_list=job["dimensions"],
        local=True,
        mode="custom_input",
    )


if __name__ == "__main__":
    main()
