"""The bookinfo demo: Istio's sample app in Python, meshed with meshlib (`make demo`)."""
