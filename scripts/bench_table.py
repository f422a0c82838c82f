"""A `qwen-runner bench --output` JSON report as the markdown table docs/benchmarks.md uses.

    python scripts/bench_table.py report.json [more.json ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

GIB = 1024**3
HEADER = ("| threads | model | impl | source | dtype | load s | start -> 1st token s | prefill tok/s | TTFT s "
          "| decode tok/s [min-max] | GB/s (of probe) | peak RSS |")


def _median(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    return "-" if not value else format(value["median"], fmt)


def table(report: dict) -> str:
    env = report["environment"]
    probe = " / ".join(f"{v['median']:.1f}" for v in report["bandwidth_gbps"].values())
    lines = [f"load average {env['load_average_start'][0]:.2f} -> {env['load_average_end'][0]:.2f}, "
             f"probe {probe} GB/s; prefill GEMM: {env.get('prefill_gemm', '-')}", "", HEADER,
             "|" + "---|" * (HEADER.count("|") - 1)]
    for row in report["results"]:
        if row["source"] == "build":
            lines.append(f"| {row['threads']} | {row['model']} | build | build | {row['dtype']} | "
                         f"{_median(row, 'build_s', '.2f')} (build) | - | - | - | - | - | "
                         f"{row['peak_rss_bytes']['median'] / GIB:.2f} GiB |")
            continue
        decode = row.get("decode_tps")
        decode_text = (f"{decode['median']:.1f} [{decode['min']:.1f}-{decode['max']:.1f}]" if decode else "-")
        gbps = row.get("gbps")
        fraction = row.get("bandwidth_fraction")
        gbps_text = f"{gbps['median']:.1f} ({fraction:.0%})" if gbps and fraction else "-"
        lines.append(
            f"| {row['threads']} | {row['model']} | {row['impl']} | {row['source']} | {row['dtype']} | "
            f"{_median(row, 'load_s', '.2f')} | {_median(row, 'start_to_first_token_s', '.2f')} | "
            f"{_median(row, 'prefill_tps', '.1f')} | {_median(row, 'ttft_s', '.3f')} | {decode_text} | "
            f"{gbps_text} | {row['peak_rss_bytes']['median'] / GIB:.2f} GiB |")
    lines.append("")
    for ratio in report.get("ratios", []):
        lines.append(f"- {ratio['threads']} thread(s), {ratio['metric']} {ratio['what']}: **{ratio['ratio']:.2f}x**")
    return "\n".join(lines)


if __name__ == "__main__":
    for name in sys.argv[1:]:
        print(table(json.loads(Path(name).read_text())))
        print()
