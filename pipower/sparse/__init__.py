"""Activation sparsity: profiling, oracle and predictor neuron selection, hot/cold placement."""
