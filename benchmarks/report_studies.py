"""Rewrites both evidence studies' tables and plots from their committed records.

    python benchmarks/report_studies.py

Runs `fashion_mnist_study.py --report_only` (the committed Fashion-MNIST study:
`benchmarks/results/fashion_mnist.md` and its plots) and
`heterogeneous_study.py --report_only` (the heterogeneous-teacher study:
`benchmarks/results/heterogeneous.md` and its plots), each from its json
record, training nothing. Exits non-zero, naming the study, if either fails.
"""

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
STUDIES = ("fashion_mnist_study.py", "heterogeneous_study.py")


def main():
    failed = []
    for script in STUDIES:
        print(f"== {script} --report_only", flush=True)
        result = subprocess.run([sys.executable, os.path.join(HERE, script), "--report_only"],
                                check=False)
        if result.returncode:
            failed.append(f"{script} (exit {result.returncode})")
    if failed:
        sys.exit(f"report_studies: failed: {', '.join(failed)}")
    print("Rewritten: benchmarks/results/fashion_mnist.md, heterogeneous.md and their plots.")


if __name__ == "__main__":
    main()
