#!/usr/bin/env bash
# On the GPU machine (the device tool's `run`), from the repository root; see training/recipes/device.py.
#   bash training/recipes/device_run.sh stage           a call that carries one more part of the payload
#   bash training/recipes/device_run.sh train ARGS...   the last call: unpack, install, train, send back
# In ARGS, @data is the films' folder, linked at ../shared/data as here, @start the starting model folder
# (at its path here when it lies in the repository) and @manifest the split manifest: so the card's recipe
# names the same paths as a run made here, and `python -m training rescore` works on it here. The run is float32 (--mixed-precision off, JAX matmuls at full
# precision) so that TensorFlow on the CPU scores the returned weights the same.
# Overrides (tests): CXR_DEVICE_DIR (.device), CXR_STAGE (/tmp/cxr-stage), CXR_DATA_LINK (../shared/data),
# PYTHON (python3), OUT.
set -euo pipefail
mode=${1:?stage or train}
shift
device_dir=${CXR_DEVICE_DIR:-.device}
stage=${CXR_STAGE:-/tmp/cxr-stage}
python=${PYTHON:-python3}
out=${OUT:?OUT must name the folder whose files come back}
mkdir -p "$stage/parts"
for part in "$device_dir"/payload.part-*; do
  [ -f "$part" ] && cp "$part" "$stage/parts/"
done
cp "$device_dir/payload.json" "$stage/payload.json"
# Which parts are here, checked against their sha256: a machine that went back between calls lost them.
"$python" - "$stage" "$mode" <<'EOF'
import hashlib, json, sys
from pathlib import Path
stage, mode = Path(sys.argv[1]), sys.argv[2]
info = json.loads((stage / "payload.json").read_text())
missing = []
for part in info["parts"]:
    path = stage / "parts" / part["name"]
    ok = path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == part["sha256"]
    if not ok:
        missing.append(part["name"])
print(f"staged {len(info['parts']) - len(missing)} of {len(info['parts'])} parts; missing: {missing or 'none'}")
if missing and mode == "train":
    sys.exit("parts are missing (the machine was given back between calls?): send each again with `stage`")
EOF
[ "$mode" = stage ] && exit 0
[ "$mode" = train ] || { echo "unknown mode $mode: stage or train" >&2; exit 2; }

x="$stage/x"
rm -rf "$x" && mkdir -p "$x"
cat "$stage"/parts/payload.part-* | tar -x -C "$x"
if compgen -G "$x/wheels/*.whl" >/dev/null; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$stage/site" \
    "$x"/wheels/*.whl
  export PYTHONPATH="$stage/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
link=${CXR_DATA_LINK:-../shared/data}
if [ -L "$link" ]; then
  ln -sfn "$x/data" "$link"
elif [ -e "$link" ]; then
  echo "$link exists and is not the payload's link: move it away or set CXR_DATA_LINK" >&2; exit 2
else
  mkdir -p "$(dirname "$link")" && ln -s "$x/data" "$link"
fi
start=$("$python" -c 'import json, sys; print(json.load(open(sys.argv[1])).get("start_path", ""))' "$stage/payload.json")
if [ -n "$start" ]; then
  mkdir -p "$start" && cp "$x"/start/* "$start/"  # the weights beside the card and familiarity model it has
else
  start="$x/start"
fi
args=()
for a in "$@"; do
  a=${a//@data/$link}; a=${a//@start/$start}; a=${a//@manifest/$x/manifest.csv}
  args+=("$a")
done
run="$stage/run"
rm -rf "$run"
export KERAS_BACKEND=${KERAS_BACKEND:-jax} JAX_DEFAULT_MATMUL_PRECISION=highest PYTHONUNBUFFERED=1
status=0
"$python" -m training train "${args[@]}" --out "$run" --cache-dir "$stage/cache" --mixed-precision off 2>&1 \
  | tee "$out/train.log" || status=$?  # pipefail: the status is training's
if [ -f "$run/model_card.json" ]; then
  # The model folder without its checkpoint, cut to what comes back (16 MiB a file, 8 files).
  tar -c -C "$stage" --exclude .ckpt run | split -b 15M -d - "$out/result.part-"
  ls -la "$out"
fi
exit "$status"
