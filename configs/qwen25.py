"""SafeCRS on Qwen2.5-0.5B-Instruct (494M params, tied embeddings, vocab 151,936), paper hyperparameters.

    python -m launch.train_sft --config=configs/qwen25.py:data_dir=DATA,model_dir=HF_DIR --workdir=RUN
    python -m launch.train_gdpo --config=configs/qwen25.py:stage=gdpo,data_dir=DATA,init=RUN --workdir=RUN2

Safe-SFT: lr 5e-5, 5% warmup, cosine, 10 epochs, 12 x 8 accumulation per
device, max length 1024. Safe-GDPO: lr 1e-6 constant, betas (0.9, 0.99),
G = 8, 4 x 8 accumulation (configs/common.py). bf16 compute, float32 master
weights, FSDP over all devices.
"""
from configs import common


def get_config(arg=None):
  c = common.paper_model(arg, "qwen2.5-0.5b", remat="full")
  # 16 prompts of up to 7168 tokens overflow a 16 GiB v5e chip in the (cached,
  # quadratic) prefill; 4 per step fit with 67% headroom (python -m launch.plan).
  c.eval.batch_size = 4
  return c
