#!/usr/bin/env bash
# Run HERE (a machine whose pip reaches the registry), inside the dev venv: puts into .whl/ the wheels of the `[dev]`
# packages that a bare GPU machine (torch, triton, transformers, accelerate, pytest... preinstalled, no network) lacks,
# at the versions this venv tested, for that machine's Python (3.12, x86-64). Carry .whl to it; gpu_check.sh installs
# them. pycocoevalcap's wheel (104 MB) is over what the device tool carries (64 MB): it travels slimmed, without SPICE
# and the CoreNLP tokenizer (spdf uses neither) and METEOR's 62 MB paraphrase table (METEOR needs Java, which the GPU
# image lacks: spdf reports it "skipped: needs java" there, and the tests comparing with pycocoevalcap's METEOR skip).
#
#   . .venv/bin/activate && bash benchmarks/gpu_wheels.sh [PYTHON_VERSION]
set -euo pipefail
cd "$(dirname "$0")/.."
py="${1:-3.12}"
# what the GPU image lacks (its package list: the device tool's KINDS.md), with the dependencies they pull in
MISSING=(datasets dill multiprocess evaluate kernels tomlkit lm-eval pytablewriter dataproperty mbstrdecoder
         pathvalidate tabledata tcolorpy typepy chardet sqlitedict word2number more-itertools pytz nltk rouge-score
         pycocotools)
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
for name in "${MISSING[@]}"; do
  version=$(python -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")
  if ! pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp "${platforms[@]}" \
       -d .whl "$name==$version" 2>/dev/null; then
    pip wheel -q --no-deps -w .whl "$name==$version"  # a pure-Python sdist (rouge-score): build its wheel here
  fi
done
# the `[gpu]` extra (issue 20's peers, GPU-only, so not installed here): pinned, for the GPU machine's Python.
# torchao ships an abi3 wheel; stanford-stk only an sdist (pure Python): its wheel is built here.
GPU_ONLY=(torchao==0.18.0 stanford-stk==0.7.1)
for spec in "${GPU_ONLY[@]}"; do
  if ! pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp "${platforms[@]}" \
       -d .whl "$spec" 2>/dev/null; then
    pip wheel -q --no-deps -w .whl "$spec"
  fi
done
slim=.whl/pycocoevalcap-slim
version=$(python -c "import importlib.metadata as m; print(m.version('pycocoevalcap'))")
pip download -q --no-deps --only-binary=:all: -d "$slim" "pycocoevalcap==$version"
python - "$slim"/pycocoevalcap-*.whl .whl <<'PY'
import sys, zipfile
from pathlib import Path
DROP = ("pycocoevalcap/spice/", "pycocoevalcap/tokenizer/stanford-corenlp", "pycocoevalcap/meteor/data/")
src, dest = Path(sys.argv[1]), Path(sys.argv[2])
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest / src.name, "w", zipfile.ZIP_DEFLATED) as zout:
    for item in zin.infolist():
        if item.filename.startswith(DROP):
            continue
        data = zin.read(item)
        if item.filename.endswith(".dist-info/RECORD"):  # the record lists what the wheel holds: drop those lines too
            data = b"".join(l for l in data.splitlines(True) if not l.decode().startswith(DROP))
        zout.writestr(item, data)
PY
rm -r "$slim"
du -sh .whl
