"""Data loaders of itop_dist (torchvision, scikit-learn digits, DALI, synthetic)."""
