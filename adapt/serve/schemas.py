"""Request and response models of the HTTP API (they are also what the OpenAPI schema shows)."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class DetectJSON(BaseModel):
    """JSON form of a detect request (the multipart form has the same fields, `image` as a file)."""

    model_config = ConfigDict(extra="forbid")
    image: str = Field(description="the encoded image (PNG, JPEG, ...) in base64; a data: URL prefix is allowed")
    threshold: float = Field(0.5, ge=0.0, le=1.0, allow_inf_nan=False,
                             description="keep detections scoring above this (a finite number in [0, 1])")
    top_k: int = Field(100, ge=1, le=1000, description="keep at most this many detections (highest scores)")


class DetectForm(BaseModel):
    """multipart/form-data form of a detect request."""

    image: bytes = Field(json_schema_extra={"format": "binary"}, description="the image file")
    threshold: float = Field(0.5, ge=0.0, le=1.0, allow_inf_nan=False)
    top_k: int = Field(100, ge=1, le=1000)


class Detection(BaseModel):
    """One detection, COCO results style."""

    bbox: list[float] = Field(min_length=4, max_length=4,
                              description="[x, y, width, height] in pixels of the uploaded image")
    score: float
    category_id: int = Field(description="1-based index of the category in the task's adapter")
    category: str = Field(description="the category name")


class ImageSize(BaseModel):
    width: int
    height: int


class DetectResponse(BaseModel):
    task: str
    adapter_version: str = Field(description="first 16 hex digits of the adapter file's sha256")
    strategy: str = Field(description="prompt-tune, linear-probe or lora")
    image: ImageSize
    detections: list[Detection]


class TaskInfo(BaseModel):
    name: str
    loaded: bool = Field(description="whether the adapter is in the server's memory now")
    adapter_version: str | None = None
    strategy: str | None = None


class TaskList(BaseModel):
    tasks: list[TaskInfo]


class AdapterInfo(BaseModel):
    name: str
    adapter_version: str
    strategy: str
    categories: list[str]
    bytes: int
    replaced: bool = Field(description="whether an earlier version of this adapter was replaced")


class AdapterStatus(BaseModel):
    name: str
    adapter_version: str | None = Field(None, description="first 16 hex digits of the file's sha256")
    strategy: str | None = None
    categories: list[str] | None = None
    status: str = Field(description="ok, refused (fails validation) or quarantined (failed twice at run time)")
    message: str | None = Field(None, description="why it is refused or quarantined")


class AdapterList(BaseModel):
    adapters: list[AdapterStatus]


class Deleted(BaseModel):
    deleted: str


class Status(BaseModel):
    status: str


class ErrorBody(BaseModel):
    code: str = Field(description="machine-readable reason, e.g. unknown_task, invalid_image, overloaded")
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody
