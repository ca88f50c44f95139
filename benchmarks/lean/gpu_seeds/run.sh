python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
  FINETUNE_DATA_DIR=$PWD/.devdata/data FINETUNE_CACHE=/tmp/ftcache PYTHONUNBUFFERED=1
python3 -c "import finetune.cli, transformers, datasets, peft; print(transformers.__version__, datasets.__version__, peft.__version__)" || exit 1
python3 .devdata/explore.py "${1:-470}" 2>&1 | tee $OUT/explore.log
