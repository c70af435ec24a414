"""The example trading models ``make build-engines`` trains itself.

Four models with the shapes and sizes the issue fixes (LightGBM 500x63 on 48
features, XGBoost 500 at depth 6, an MLP 48-256-256-1, an LSTM over 32 steps
of 16 features). They are trained on the synthetic data of :mod:`.data` with
a fixed seed in seconds; they exist to exercise the build, not to trade.
"""
