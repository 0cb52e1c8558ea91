#!/usr/bin/env bash
# helper D: the conversion runs, one after another, 1 thread each
cd "$(dirname "$0")/../.."
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
X=.venv/bin/xmoe
run() {  # name, convert flags..., -- eval flags...
  name=$1; shift
  conv=(); while [ "$1" != "--" ]; do conv+=("$1"); shift; done; shift
  echo "=== $name $(date +%T)"
  /usr/bin/time -f "convert %e s" $X convert --model minilm --experts 32 --out runs/convert/$name --overwrite --threads 1 --no-progress "${conv[@]}"
  /usr/bin/time -f "eval %e s" $X convert-eval runs/convert/$name --threads 1 --no-progress "$@" --repeats 3
}
run d-relu-b50 --relufy --refit --flop-budget 0.5 -- --thresholds saved --routers learned,oracle
run d-relu-b30 --relufy --refit --flop-budget 0.3 -- --thresholds saved --routers learned,oracle
run d-gelu-b50 --refit --flop-budget 0.5 -- --thresholds saved --routers learned,oracle
run d-relu-sel-b50 --relufy --refit --flop-budget 0.5 --router-target select -- --thresholds saved --routers learned
run d-relu-norefit-b50 --relufy --flop-budget 0.5 -- --thresholds saved,1.0 --routers learned
echo "=== done $(date +%T)"
