# The recipe in NVIDIA's PyTorch container, which ships CUDA, PyTorch and TransformerEngine.
#   docker build -t llama3-te-recipe .
#   docker run --gpus all --rm -it llama3-te-recipe torchrun --nproc_per_node=8 train_fsdp2.py --config-name L1_genomic_1b
FROM nvcr.io/nvidia/pytorch:25.10-py3
WORKDIR /workspace/recipe
COPY requirements.txt constraints.txt ./
RUN pip install --no-cache-dir -r requirements.txt wandb
COPY . .
