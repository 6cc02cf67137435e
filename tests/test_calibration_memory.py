import json
import subprocess
import sys

SEQ_LEN = 128 * 130  # 16,640 tokens: one S x S fp32 matrix would take 1.03 GiB
LIMIT_MIB = 256      # below even an S x S boolean matrix (264 MiB)

SCRIPT = f"""
import json, torch
from dit_sparse import SparseAttentionConfig, TokenLayout
from dit_sparse.planner import build_plan

def peak_kib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM"))

torch.set_num_threads(1)
layout = TokenLayout((1, 128, 130))
assert layout.seq_len == {SEQ_LEN}
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, layout.seq_len, 1, 16, generator=g) for _ in range(3))
build_plan(q[:, :1024], k[:, :1024], TokenLayout((1, 32, 32)), SparseAttentionConfig(pattern="auto"), v=v[:, :1024])
before = peak_kib()
plan, report = build_plan(q, k, layout, SparseAttentionConfig(pattern="auto", block_size=128), v=v)
print(json.dumps({{"before": before, "after": peak_kib(), "family": report.family}}))
"""


def test_calibration_and_planning_never_hold_an_s_by_s_matrix():
    result = subprocess.run([sys.executable, "-c", SCRIPT], check=True, capture_output=True, text=True)
    peaks = json.loads(result.stdout.strip().splitlines()[-1])
    grown_mib = (peaks["after"] - peaks["before"]) / 1024
    assert grown_mib < LIMIT_MIB, f"calibration raised the peak resident memory by {grown_mib:.0f} MiB"
