"""Render spatial attention and cross-attention weights over an image (see dalg.tools.attention_maps).

python src/visualize_attention.py --image photo.jpg [--ckpt run.ckpt | --model dalg_tiny] [--size 224]
"""

from dalg.tools.attention_maps import main

if __name__ == "__main__":
    main()
