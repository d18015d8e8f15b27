"""The paper's numbers (arXiv 2506.16659, LLaMA on C4; docs/sources.md).

``TABLE[optimizer][size] = (eval perplexity, weights + optimizer state in
GB at 2 bytes a value)``, optimizers named as in ``optimizer.name``.
"""

TABLE = {
    'adamw': {'60M': (30.05, 0.35), '130M': (23.13, 0.81),
              '350M': (18.77, 2.21), '1B': (16.52, 8.04)},
    'stable_spam': {'60M': (28.77, 0.35), '130M': (22.20, 0.81),
                    '350M': (16.80, 2.21), '1B': (13.97, 8.04)},
    'muon': {'60M': (28.86, 0.23), '130M': (22.20, 0.54),
             '350M': (16.70, 1.47), '1B': (14.18, 5.36)},
    'galore': {'60M': (34.58, 0.28), '130M': (25.31, 0.61),
               '350M': (19.37, 1.59), '1B': (15.57, 4.76)},
    'fira': {'60M': (30.34, 0.28), '130M': (22.96, 0.61),
             '350M': (16.82, 1.59), '1B': (15.10, 4.76)},
    'swan': {'60M': (30.00, 0.25), '130M': (22.83, 0.46),
             '350M': (17.14, 1.00), '1B': (14.42, 3.20)},
    'apollo': {'60M': (30.94, 0.28), '130M': (22.93, 0.61),
               '350M': (16.75, 1.59), '1B': (14.20, 4.76)},
    'apollo_mini': {'60M': (31.85, 0.25), '130M': (23.63, 0.46),
                    '350M': (17.11, 1.00), '1B': (14.13, 3.20)},
    'scale': {'60M': (30.81, 0.15), '130M': (22.57, 0.32),
              '350M': (16.32, 0.80), '1B': (14.25, 2.81)},
}
# The bottom-up study's claims (the paper's Section 3 and Figures 2-5).
ABLATIONS = ('sgd', 'sgd_column_norm', 'sgd_row_norm', 'scale_first_last')
# Stable-SPAM's released 130M script (its own repository, not the SCALE paper;
# scripts_BF16/stablespam.sh): 20,000 steps (`--total_T`), the
# momentum reset every 1,000 (`--update_proj_gap`).
STABLE_SPAM_STEPS = 20_000
