# Sourced by the GPU scripts (run.sh, semi.sh, qata.sh) after cd to the repository root, with PY and WORK set
# (and DEVRUN: the carried folder holding whl/ and stub/, default .devrun; qata.sh uses .devrun/qata):
# installs the carried wheels into $WORK/site, puts the stand-in encoder package first on PYTHONPATH (every
# report must come from the carried text cache) and checks that torch, Lightning and MONAI import.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
DEVRUN=${DEVRUN:-.devrun}
if [ ! -d "$DEVRUN/whl" ]; then echo "no $DEVRUN/whl: run python bench/gpu/prepare.py and carry $DEVRUN" >&2; exit 2; fi
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
    "$DEVRUN"/whl/*.whl || exit 1
export PYTHONPATH="$PWD/$DEVRUN/stub:$WORK/site:$PWD/src:${PYTHONPATH:-}"
nvidia-smi -L 2>/dev/null
$PY -c "import torch, lightning, monai; print('torch', torch.__version__, 'lightning', lightning.__version__,
'monai', monai.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0))" || exit 1
