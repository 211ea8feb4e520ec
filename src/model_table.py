"""Print parameters / GFLOPs @512 / descriptor size for every model config (see dalg.tools.model_table).

python src/model_table.py [--size 512] [--models dalg_cross dolg_r50] [--out experiments/model_table.md]
"""

from dalg.tools.model_table import main

if __name__ == "__main__":
    main()
