"""The four bookinfo services, meshed with meshlib: one middleware line and a meshlib client each.

Each configures itself from MESHLIB_* variables (service, version, policy file, metrics port,
propagated headers, traces exporter), as a deployed service would. They call each other by
their mesh names (http://details:9080, http://reviews:9080, http://ratings:9080); mesh.yaml
says where those are and how to route. No app copies a header, makes a span or picks a version.
"""
