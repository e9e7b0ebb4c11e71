"""The torch library: ablation engine, model sequences, tie rule, running statistics and the paper's
algorithms (greedy, rotation, dissection, attribute formulas). No store, no argparse, no run context."""
