"""gRPC contracts of PMLM's on-site services (package pmlm.v1), generated from protos/pmlm/v1/*.proto.

Do not edit the *_pb2* files; regenerate them after changing a .proto (tests/test_grpc_protos.py
fails while they are stale):

    python -m grpc_tools.protoc -I protos --python_out=. --grpc_python_out=. --pyi_out=. protos/pmlm/v1/*.proto
"""
