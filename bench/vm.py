"""make bench-vm: Sluice's pure request path timed inside Envoy's V8, piece by piece.

Runs `envoy --mode validate` (which configures the plugin, and so runs the timing loop of
the `vm-bench` build) on make bench's configuration (c), and prints the figures.
Usage: vm.py WASM
"""
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import run

wasm = Path(sys.argv[1]).resolve()
run.need(wasm, "run `make bench-vm`")
with tempfile.TemporaryDirectory(prefix="sluice-vm-bench-") as tmp:
    config = Path(tmp) / "envoy.yaml"
    config.write_text(run.sluice_yaml(tmp, run.free_port(), run.free_port(), run.free_port())
                      .replace(str(run.WASM), str(wasm)))
    out = subprocess.run([str(run.ENVOY), "--mode", "validate", "-c", str(config), "--concurrency", "1"],
                         env=run.ENV, capture_output=True, text=True, timeout=300)
lines = [l.split("sluice vm-bench: ", 1)[1] for l in (out.stdout + out.stderr).splitlines() if "sluice vm-bench: " in l]
if not lines:
    sys.exit(f"bench: no vm-bench output; envoy said:\n{out.stderr[-2000:]}")
print("Inside Envoy's V8, ns per iteration (after a warm-up):")
for line in lines:
    print("  " + line)
