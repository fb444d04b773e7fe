"""Tumor-score model training: ResNet50 + 3-class head (+ the TUPAC16 task 2 molecular
regression head when the train slides carry molecular scores) on Ray Train, exported for TF
Serving.

The run, in the driver (`train.train_tumor`):
1. validate the data set (labels, splits) and verify every shard (checksum, parse): bad shards
   are skipped and counted; an unusable data set or weights file fails here, before any
   training time is spent;
2. start the training loop on Ray: Ray Train's `TensorflowTrainer` (one worker locally, N on a
   cluster; MultiWorkerMirroredStrategy inside, for which Ray Train sets TF_CONFIG; each
   worker trains on its own share of the train records, `batch_size` / N tiles per step,
   gradients all-reduced; `multiworker` runs the steps Keras' fit cannot with N > 1). Where
   `ray.train` cannot be imported (it needs pandas, pyarrow and pydantic) the same loop runs
   in one Ray actor with the same checkpoint/report contract (backend "ray_actor");
3. fit the slide cut points when asked (`calibrate`) and export the best (or last) weights
   through `export_model`, with the score rule and the molecular head's facts in the metadata —
   only when the loop finished.

The loop (`loop.train_loop_per_worker`): two-phase transfer learning (the seed's defaults: head
only with Adam 1e-3 for 4 epochs, then the last ResNet block `conv5_*` with SGD 1e-4 momentum
0.9), a checkpoint every epoch (weights, optimizer state, epoch, phase, history, early-stopping
state) reported to Ray, resume from the latest checkpoint after a crash, per-epoch tile and
slide metrics (accuracy, confusion matrix, quadratic weighted kappa, Spearman of the expected
score and of the molecular head against the molecular score), TensorBoard logs, early stopping,
and a journal per worker (`<run_dir>/workers/rank-<r>.jsonl`: its data share, batch,
checkpoint writes, weights digest).

Modules, each importing only those before it: `config` (the run's settings and result),
`model` (build, phases, optimizer state), `checkpoints` (files and the backends' sessions),
`predict` (validation predictions and metrics), `multiworker` (steps with several workers),
`loop` (the per-worker loop), `train` (the driver).
"""
