"""Finetune an embedding model: `python train.py [model=bge] [trainer=gpu] [key=value ...]`. See README.md."""

from lit_embed.train import main

if __name__ == "__main__":
    main()
