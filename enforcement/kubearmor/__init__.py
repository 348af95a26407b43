"""The ``kubearmor`` backend: policies put in force by the local KubeArmor daemon
over gRPC.  See ``backend.py``; the settings live in ``settings.py`` so that
reading an agent config does not import grpc."""
