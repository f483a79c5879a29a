"""A two-scale YOLOv8 Detect head with its box decoding, as ultralytics writes it, for the tests
that convert it (tests/test_tflite_convert.py) and run it on both TFLite runtimes (tflitekit)."""

from __future__ import annotations


def decoded_yolo():
    """The module, eval mode, seeded weights: [N, 3, 32, 32] in, [N, 4 + 3, 80] out (boxes in
    pixels: centre x, y, width, height; then 3 class scores), for 16 + 64 anchors."""
    import torch
    from torch import nn

    def conv(ci, co, k=3, s=1):
        return nn.Sequential(nn.Conv2d(ci, co, k, s, k // 2, bias=False), nn.BatchNorm2d(co), nn.SiLU())

    class DecodedYolo(nn.Module):
        def __init__(self, nc=3, reg_max=8, size=32):
            super().__init__()
            self.nc, self.reg_max, self.no = nc, reg_max, nc + 4 * reg_max
            self.p3, self.p4 = nn.Sequential(conv(3, 8, 3, 2), conv(8, 16, 3, 2)), conv(16, 32, 3, 2)
            self.cv2 = nn.ModuleList(nn.Sequential(conv(c, 16), nn.Conv2d(16, 4 * reg_max, 1)) for c in (16, 32))
            self.cv3 = nn.ModuleList(nn.Sequential(conv(c, 16), nn.Conv2d(16, nc, 1)) for c in (16, 32))
            self.dfl = nn.Conv2d(reg_max, 1, 1, bias=False).requires_grad_(False)
            self.dfl.weight.data[:] = torch.arange(reg_max, dtype=torch.float32).view(1, reg_max, 1, 1)
            anchors, strides = [], []
            for stride in (4, 8):
                n = size // stride
                ys, xs = torch.meshgrid(torch.arange(n) + 0.5, torch.arange(n) + 0.5, indexing="ij")
                anchors.append(torch.stack((xs, ys), 0).view(2, -1))
                strides.append(torch.full((1, n * n), float(stride)))
            self.register_buffer("anchors", torch.cat(anchors, 1).unsqueeze(0))
            self.register_buffer("strides", torch.cat(strides, 1))

        def forward(self, x):
            p3 = self.p3(x)
            maps = [p3, self.p4(p3)]
            outs = [torch.cat((self.cv2[i](m), self.cv3[i](m)), 1) for i, m in enumerate(maps)]
            x_cat = torch.cat([o.view(maps[0].shape[0], self.no, -1) for o in outs], 2)
            box, cls = x_cat.split((4 * self.reg_max, self.nc), 1)
            b, _, a = box.shape
            d = self.dfl(box.view(b, 4, self.reg_max, a).transpose(2, 1).softmax(1)).view(b, 4, a)
            lt, rb = d.chunk(2, 1)
            x1y1, x2y2 = self.anchors - lt, self.anchors + rb
            dbox = torch.cat(((x1y1 + x2y2) / 2, x2y2 - x1y1), 1) * self.strides
            return torch.cat((dbox, cls.sigmoid()), 1)


    torch.manual_seed(0)
    return DecodedYolo().eval()
