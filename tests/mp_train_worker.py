"""Worker of tests/test_training_multiprocess.py: fine-tune the tiny CGF model on CPU (one process, or one rank of a
``torchrun`` / ``accelerate launch`` group) and record which ranks wrote a checkpoint.

Usage: python tests/mp_train_worker.py OUT_DIR DATA_DIR BATCH_SIZE"""
import os
import sys

import torch


def main(out: str, data_dir: str, batch_size: int) -> None:
    torch.set_num_threads(1)
    from cgf_fhe.training import api, seeds
    from cgf_fhe.training.recipes import get_recipe

    from cgf_fhe.training.engine import get_accelerator

    save = seeds.save_checkpoint

    def recording_save(*args, **kwargs):  # which ranks write the checkpoint, and in a group of how many
        with open(os.path.join(out, "writers.txt"), "a") as f:
            f.write(f"{get_accelerator('cpu').process_index} {get_accelerator('cpu').num_processes}\n")
        return save(*args, **kwargs)

    seeds.save_checkpoint = recording_save
    os.makedirs(out, exist_ok=True)
    opts = api.RunOptions(data_dir=data_dir, max_length=64, max_train_samples=32, max_eval_samples=16,
                          device="cpu", progress=False, keep_state=True)
    recipe = get_recipe("reference", lr=3e-3, epochs=14, freeze_embeddings=False, batch_size=batch_size, max_length=64)
    api.finetune("tiny", os.path.join(out, "ckpt"), "cgf", 0.5, 3, recipe, opts)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
