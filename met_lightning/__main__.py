"""`python -m met_lightning [overrides]`: the Hydra training entry (offline demo by default)."""

from met_lightning.train import main

if __name__ == "__main__":
    main()
