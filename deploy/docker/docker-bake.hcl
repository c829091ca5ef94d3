# The three images in dependency order, in one build: base (CUDA + torch) <- app (recforge) <- dev (JupyterLab).
#   docker buildx bake -f deploy/docker/docker-bake.hcl            # all three, tagged locally
#   TAG=1.2.3 REGISTRY=ghcr.io/acme/recforge docker buildx bake -f deploy/docker/docker-bake.hcl --push
# app and dev are built FROM the other targets' results (contexts "target:..."), not from whatever a
# registry or the local daemon holds under that name, so one bake is always self-consistent.
variable "REGISTRY" { default = "recforge" }
variable "TAG" { default = "0.1.0" }
variable "TORCH_TAG" { default = "2.13.0-cu130" }
# CI sets this to the tag resolved to its digest (nvidia/cuda:...@sha256:...).
variable "CUDA_IMAGE" { default = "nvidia/cuda:13.0.3-base-ubuntu22.04@sha256:73ab6dfb3814a5097cd456736e70650ef9dc72343be4117d0400de78168760fe" }

group "default" {
  targets = ["base", "app", "dev"]
}

target "base" {
  context    = "."
  dockerfile = "deploy/docker/base.Dockerfile"
  args       = { CUDA_IMAGE = CUDA_IMAGE }
  tags       = ["${REGISTRY}-base:${TORCH_TAG}"]
}

target "app" {
  context    = "."
  dockerfile = "deploy/docker/app.Dockerfile"
  contexts   = { recforge-base = "target:base" }
  args       = { BASE_IMAGE = "recforge-base" }
  tags       = ["${REGISTRY}-app:${TAG}"]
}

target "dev" {
  context    = "."
  dockerfile = "deploy/docker/dev.Dockerfile"
  contexts   = { recforge-app = "target:app" }
  args       = { APP_IMAGE = "recforge-app" }
  tags       = ["${REGISTRY}-dev:${TAG}"]
}
