# sourced by each device call: wheels, environment, result packing
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
export DATA_DIR=data/cache/experiment
mkdir -p runs logs
left() { echo $(( ${CALL_END:-560} - ($(date +%s) - T0) )); }
pack() {  # small result files only
    find runs logs data/cache/experiment -maxdepth 3 \( -name '*.jsonl' -o -name '*.csv' -o -name '*.md' -o -name '*.png' -o -name 'pick.json' -o -name '*.log' -o -name 'manifest.json' -o -name 'documents.tsv' -o -name '*.partial' \) -size -20M -print0 2>/dev/null | tar czf "$OUT/results-$1.tar.gz" --null -T -
    ls -la "$OUT"; nvidia-smi --query-gpu=index,memory.used --format=csv
}
