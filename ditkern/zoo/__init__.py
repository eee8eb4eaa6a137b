"""Reference pipelines trained here on scikit-learn's digits, and the fidelity harness."""
