"""Render spatial attention and cross-attention weights over an image (see dalg.models.attention_viz).

python src/visualize_attention.py --image photo.jpg [--ckpt run.ckpt | --model dalg_tiny] [--size 224]
"""

from dalg.models.attention_viz import main

if __name__ == "__main__":
    main()
