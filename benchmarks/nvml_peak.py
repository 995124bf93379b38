"""Adds the peak NVML device memory of a benchmark process to its JSON report.

The device scripts log every process's GPU memory with
`nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits -lms 200 > LOG`;
the report carries its process id ("pid"). Usage: python benchmarks/nvml_peak.py LOG REPORT.json
"""

import json
import sys


def peak_bytes(log_path: str, pid: int) -> int | None:
    peak = None
    with open(log_path) as log:
        for line in log:
            fields = [f.strip() for f in line.split(",")]
            if len(fields) == 2 and fields[0] == str(pid) and fields[1].isdigit():
                peak = max(peak or 0, int(fields[1]) << 20)
    return peak


if __name__ == "__main__":
    log_path, report_path = sys.argv[1], sys.argv[2]
    with open(report_path) as f:
        report = json.load(f)
    report["gpu_bytes_nvml_peak"] = peak_bytes(log_path, report["pid"])
    if report.get("gpu_budget_bytes") and report["gpu_bytes_nvml_peak"] is not None:
        report["peak_within_gpu_budget"] = report["gpu_bytes_nvml_peak"] <= report["gpu_budget_bytes"]
    with open(report_path, "w") as f:
        json.dump(report, f, indent=1)
    print(report_path, "NVML peak", report["gpu_bytes_nvml_peak"], "budget", report.get("gpu_budget_bytes"))
