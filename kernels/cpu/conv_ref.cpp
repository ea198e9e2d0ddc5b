// Geometry helpers and the naive 3-D convolution references. Each reference loops over the
// mathematical definition with double accumulators, so that its only rounding is the final cast to
// float: it is the ground truth the oneDNN (and cuDNN) versions are tested against, not a fast
// path.
//
// Regular conv (cross-correlation, as cuDNN and PyTorch define it), input position i =
// o*stride-pad+k: y[n,o,co]   = b[co] + sum_{k,ci} x[n, o*s-p+k, ci] * w[co,k,ci] Transposed conv
// (k = stride = 2), the backward-data of the conv with KRSC filter w[ci,k,co]: y[n,2i+k,co] = b[co]
// + sum_ci x[n,i,ci] * w[ci,k,co] so every output voxel o receives exactly one tap per axis: i =
// o/2, k = o%2.
#include <algorithm>
#include <sstream>
#include <vector>

#include "core/error.hpp"
#include "kernels/cpu/conv.hpp"

namespace medseg::cpu {

namespace {

// Offset of voxel (n, d, h, w) of a channels-last tensor with spatial size (D, H, W) and C
// channels.
inline int64_t voxel(int64_t n, int64_t d, int64_t h, int64_t w, int64_t D, int64_t H, int64_t W,
                     int64_t C) {
  return (((n * D + d) * H + h) * W + w) * C;
}

int64_t conv_out_size(int64_t in, int k, int stride, int pad) {
  return (in + 2 * pad - k) / stride + 1;
}

}  // namespace

// ------------------------------------------------------------------------------------ geometry

ConvGeometry ConvGeometry::conv(const Shape& in, int64_t cout, int k, int stride, int pad) {
  MEDSEG_CHECK(in.n >= 1 && in.d >= 1 && in.h >= 1 && in.w >= 1 && in.c >= 1, "conv input shape ",
               in, " has an empty dimension");
  MEDSEG_CHECK(cout >= 1, "conv of input ", in, " with ", cout, " output channels");
  MEDSEG_CHECK((k == 1 || k == 3) && (stride == 1 || stride == 2) && pad >= 0 && pad < k,
               "conv of input ", in, " with unsupported k=", k, " stride=", stride, " pad=", pad,
               " (k in {1,3}, stride in {1,2}, 0 <= pad < k)");
  ConvGeometry g;
  g.n = in.n;
  g.id = in.d;
  g.ih = in.h;
  g.iw = in.w;
  g.cin = in.c;
  g.cout = cout;
  g.k = k;
  g.stride = stride;
  g.pad = pad;
  g.transposed = false;
  MEDSEG_CHECK(in.d + 2 * pad >= k && in.h + 2 * pad >= k && in.w + 2 * pad >= k, "conv input ", in,
               " is smaller than the k=", k, " kernel with pad=", pad);
  g.od = conv_out_size(in.d, k, stride, pad);
  g.oh = conv_out_size(in.h, k, stride, pad);
  g.ow = conv_out_size(in.w, k, stride, pad);
  return g;
}

ConvGeometry ConvGeometry::transpose2(const Shape& in, int64_t cout) {
  MEDSEG_CHECK(in.n >= 1 && in.d >= 1 && in.h >= 1 && in.w >= 1 && in.c >= 1,
               "transposed conv input shape ", in, " has an empty dimension");
  MEDSEG_CHECK(cout >= 1, "transposed conv of input ", in, " with ", cout, " output channels");
  ConvGeometry g;
  g.n = in.n;
  g.id = in.d;
  g.ih = in.h;
  g.iw = in.w;
  g.cin = in.c;
  g.cout = cout;
  g.k = 2;
  g.stride = 2;
  g.pad = 0;
  g.transposed = true;
  g.od = 2 * in.d;
  g.oh = 2 * in.h;
  g.ow = 2 * in.w;
  return g;
}

Shape ConvGeometry::weight_shape() const {
  if (transposed) return Shape{cin, 2, 2, 2, cout};
  return Shape{cout, k, k, k, cin};
}

double ConvGeometry::flops() const {
  // Regular conv: every output value takes k^3 * Cin multiply-adds (padding taps included, the
  // usual convention). Transposed: each output voxel receives one tap per axis, so Cin
  // multiply-adds.
  const double taps = transposed ? 1.0 : static_cast<double>(k) * k * k;
  return 2.0 * static_cast<double>(n) * static_cast<double>(od * oh * ow) *
         static_cast<double>(cout) * static_cast<double>(cin) * taps;
}

std::string ConvGeometry::str() const {
  std::ostringstream os;
  if (transposed)
    os << "convT k2 s2";
  else
    os << "conv k" << k << " s" << stride << " p" << pad;
  os << " " << in_shape() << " -> " << out_shape();
  return os.str();
}

void validate(const ConvGeometry& g) {
  MEDSEG_CHECK(g.n >= 1 && g.id >= 1 && g.ih >= 1 && g.iw >= 1 && g.cin >= 1 && g.cout >= 1,
               "conv geometry has an empty dimension: input ", g.in_shape(), ", output ",
               g.out_shape());
  ConvGeometry expected;
  if (g.transposed) {
    expected = ConvGeometry::transpose2(g.in_shape(), g.cout);
  } else {
    MEDSEG_CHECK(
        (g.k == 1 || g.k == 3) && (g.stride == 1 || g.stride == 2) && g.pad >= 0 && g.pad < g.k,
        "conv geometry with unsupported k=", g.k, " stride=", g.stride, " pad=", g.pad, ": input ",
        g.in_shape(), ", output ", g.out_shape());
    expected = ConvGeometry::conv(g.in_shape(), g.cout, g.k, g.stride, g.pad);
  }
  MEDSEG_CHECK(g == expected, "inconsistent conv geometry: ", g.str(), " (k=", g.k,
               " stride=", g.stride, " pad=", g.pad, "), expected output ", expected.out_shape(),
               (g.transposed ? " (transposed needs k=2 stride=2 pad=0)" : ""));
}

void check_conv_shapes(const ConvGeometry& g, const Shape& x, const Shape& w, const Shape& y) {
  validate(g);
  MEDSEG_CHECK(x == g.in_shape(), "conv input has shape ", x, ", geometry ", g.str(), " expects ",
               g.in_shape());
  MEDSEG_CHECK(w == g.weight_shape(), "conv weight has shape ", w, ", geometry ", g.str(),
               " expects ", g.weight_shape());
  MEDSEG_CHECK(y == g.out_shape(), "conv output has shape ", y, ", geometry ", g.str(), " expects ",
               g.out_shape());
}

// ------------------------------------------------------------------------------------ references

void conv3d_forward_ref(const ConvGeometry& g, const float* x, const float* w, const float* b,
                        float* y) {
  validate(g);
  MEDSEG_CHECK(x && w && y, "conv3d_forward_ref: null x, w or y for ", g.str());
  const int64_t cin = g.cin, cout = g.cout;
  for (int64_t n = 0; n < g.n; ++n)
    for (int64_t od = 0; od < g.od; ++od)
      for (int64_t oh = 0; oh < g.oh; ++oh)
        for (int64_t ow = 0; ow < g.ow; ++ow) {
          float* yp = y + voxel(n, od, oh, ow, g.od, g.oh, g.ow, cout);
          for (int64_t co = 0; co < cout; ++co) {
            double acc = b ? static_cast<double>(b[co]) : 0.0;
            if (g.transposed) {
              const float* xp = x + voxel(n, od / 2, oh / 2, ow / 2, g.id, g.ih, g.iw, cin);
              const int64_t tap = ((od % 2) * 2 + oh % 2) * 2 + ow % 2;
              for (int64_t ci = 0; ci < cin; ++ci)
                acc += static_cast<double>(xp[ci]) * w[(ci * 8 + tap) * cout + co];
            } else {
              for (int kd = 0; kd < g.k; ++kd) {
                const int64_t id = od * g.stride - g.pad + kd;
                if (id < 0 || id >= g.id) continue;
                for (int kh = 0; kh < g.k; ++kh) {
                  const int64_t ih = oh * g.stride - g.pad + kh;
                  if (ih < 0 || ih >= g.ih) continue;
                  for (int kw = 0; kw < g.k; ++kw) {
                    const int64_t iw = ow * g.stride - g.pad + kw;
                    if (iw < 0 || iw >= g.iw) continue;
                    const float* xp = x + voxel(n, id, ih, iw, g.id, g.ih, g.iw, cin);
                    const float* wp = w + (((co * g.k + kd) * g.k + kh) * g.k + kw) * cin;
                    for (int64_t ci = 0; ci < cin; ++ci)
                      acc += static_cast<double>(xp[ci]) * wp[ci];
                  }
                }
              }
            }
            yp[co] = static_cast<float>(acc);
          }
        }
}

void conv3d_backward_data_ref(const ConvGeometry& g, const float* dy, const float* w, float* dx) {
  validate(g);
  MEDSEG_CHECK(dy && w && dx, "conv3d_backward_data_ref: null dy, w or dx for ", g.str());
  const int64_t cin = g.cin, cout = g.cout;
  std::vector<double> acc(static_cast<size_t>(cin));
  for (int64_t n = 0; n < g.n; ++n)
    for (int64_t id = 0; id < g.id; ++id)
      for (int64_t ih = 0; ih < g.ih; ++ih)
        for (int64_t iw = 0; iw < g.iw; ++iw) {
          std::fill(acc.begin(), acc.end(), 0.0);
          if (g.transposed) {
            // Input voxel i feeds outputs 2i+k, k in {0,1}^3.
            for (int tap = 0; tap < 8; ++tap) {
              const int64_t od = 2 * id + (tap >> 2), oh = 2 * ih + ((tap >> 1) & 1),
                            ow = 2 * iw + (tap & 1);
              const float* dyp = dy + voxel(n, od, oh, ow, g.od, g.oh, g.ow, cout);
              for (int64_t ci = 0; ci < cin; ++ci) {
                const float* wp = w + (ci * 8 + tap) * cout;
                double s = 0.0;
                for (int64_t co = 0; co < cout; ++co) s += static_cast<double>(dyp[co]) * wp[co];
                acc[ci] += s;
              }
            }
          } else {
            // Input voxel i feeds output o through tap k when o*stride - pad + k == i.
            for (int kd = 0; kd < g.k; ++kd) {
              const int64_t td = id + g.pad - kd;
              if (td < 0 || td % g.stride != 0 || td / g.stride >= g.od) continue;
              for (int kh = 0; kh < g.k; ++kh) {
                const int64_t th = ih + g.pad - kh;
                if (th < 0 || th % g.stride != 0 || th / g.stride >= g.oh) continue;
                for (int kw = 0; kw < g.k; ++kw) {
                  const int64_t tw = iw + g.pad - kw;
                  if (tw < 0 || tw % g.stride != 0 || tw / g.stride >= g.ow) continue;
                  const float* dyp = dy + voxel(n, td / g.stride, th / g.stride, tw / g.stride,
                                                g.od, g.oh, g.ow, cout);
                  for (int64_t co = 0; co < cout; ++co) {
                    const double d = dyp[co];
                    const float* wp = w + (((co * g.k + kd) * g.k + kh) * g.k + kw) * cin;
                    for (int64_t ci = 0; ci < cin; ++ci) acc[ci] += d * wp[ci];
                  }
                }
              }
            }
          }
          float* dxp = dx + voxel(n, id, ih, iw, g.id, g.ih, g.iw, cin);
          for (int64_t ci = 0; ci < cin; ++ci) dxp[ci] = static_cast<float>(acc[ci]);
        }
}

void conv3d_backward_weights_ref(const ConvGeometry& g, const float* dy, const float* x, float* dw,
                                 float* db) {
  validate(g);
  MEDSEG_CHECK(dy && x && dw, "conv3d_backward_weights_ref: null dy, x or dw for ", g.str());
  const int64_t cin = g.cin, cout = g.cout;
  const Shape ws = g.weight_shape();
  std::vector<double> acc(static_cast<size_t>(ws.numel()), 0.0);
  std::vector<double> bacc(static_cast<size_t>(cout), 0.0);
  for (int64_t n = 0; n < g.n; ++n)
    for (int64_t od = 0; od < g.od; ++od)
      for (int64_t oh = 0; oh < g.oh; ++oh)
        for (int64_t ow = 0; ow < g.ow; ++ow) {
          const float* dyp = dy + voxel(n, od, oh, ow, g.od, g.oh, g.ow, cout);
          for (int64_t co = 0; co < cout; ++co) bacc[co] += dyp[co];
          if (g.transposed) {
            const float* xp = x + voxel(n, od / 2, oh / 2, ow / 2, g.id, g.ih, g.iw, cin);
            const int64_t tap = ((od % 2) * 2 + oh % 2) * 2 + ow % 2;
            for (int64_t ci = 0; ci < cin; ++ci) {
              const double xv = xp[ci];
              double* ap = acc.data() + (ci * 8 + tap) * cout;
              for (int64_t co = 0; co < cout; ++co) ap[co] += xv * dyp[co];
            }
            continue;
          }
          for (int kd = 0; kd < g.k; ++kd) {
            const int64_t id = od * g.stride - g.pad + kd;
            if (id < 0 || id >= g.id) continue;
            for (int kh = 0; kh < g.k; ++kh) {
              const int64_t ih = oh * g.stride - g.pad + kh;
              if (ih < 0 || ih >= g.ih) continue;
              for (int kw = 0; kw < g.k; ++kw) {
                const int64_t iw = ow * g.stride - g.pad + kw;
                if (iw < 0 || iw >= g.iw) continue;
                const float* xp = x + voxel(n, id, ih, iw, g.id, g.ih, g.iw, cin);
                for (int64_t co = 0; co < cout; ++co) {
                  const double d = dyp[co];
                  double* ap = acc.data() + (((co * g.k + kd) * g.k + kh) * g.k + kw) * cin;
                  for (int64_t ci = 0; ci < cin; ++ci) ap[ci] += d * xp[ci];
                }
              }
            }
          }
        }
  for (size_t i = 0; i < acc.size(); ++i) dw[i] = static_cast<float>(acc[i]);
  if (db)
    for (int64_t co = 0; co < cout; ++co) db[co] = static_cast<float>(bacc[co]);
}

}  // namespace medseg::cpu
