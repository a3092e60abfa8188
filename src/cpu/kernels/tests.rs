//! The SIMD kernels against the portable ones, and their in-cache rates.

use super::*;
use crate::rng::Rng;

/// The SIMD kernels of this CPU, or a printed skip.
pub(crate) fn simd() -> Option<Isa> {
    let isa = Isa::get();
    if isa == Isa::PORTABLE {
        eprintln!("SKIPPED: this CPU has no AVX2+FMA+F16C (or is not x86-64): only the portable kernels exist");
        return None;
    }
    eprintln!("testing the {} kernels against the portable ones", isa.name());
    Some(isa)
}

/// |a - b| <= 1e-5 * scale, where `scale` bounds the magnitude of the terms summed
/// (sum of |products|), so cancellation does not inflate the relative error.
pub(crate) fn close(a: f32, b: f32, scale: f32, what: &str) {
    assert!((a - b).abs() <= 1e-5 * scale.max(f32::MIN_POSITIVE), "{what}: simd {a} vs portable {b} (scale {scale})");
}

fn dims() -> Vec<usize> {
    let mut d: Vec<usize> = (1..=40).collect();
    d.extend((48..=512).step_by(8));
    d.extend([63, 65, 127, 129, 255, 257, 511]);
    d
}

#[test]
fn simd_matches_portable() {
    let Some(isa) = simd() else { return };
    let port = Isa::PORTABLE;
    let mut rng = Rng(0x243f_6a88_85a3_08d3);
    for dim in dims() {
        // 6 heads and 37 keys: full register blocks plus remainders of both.
        let (g, n, stride) = (6, 37, 40);
        let q = rng.vec(g * dim, 1.0);
        let k = rng.vec(n * dim, 1.0);
        let (mut s1, mut s2) = (vec![0f32; g * stride], vec![0f32; g * stride]);
        let mut buf = vec![0f32; 48 * dim];
        isa.scores(&q, g, dim, isa.k_tile(&k, dim, &mut buf), n, &mut s1, stride, &mut Prefetch::new(&k));
        port.scores(&q, g, dim, port.k_tile(&k, dim, &mut buf), n, &mut s2, stride, &mut Prefetch::none());
        for h in 0..g {
            for j in 0..n {
                let mag: f32 = (0..dim).map(|i| (q[h * dim + i] * k[j * dim + i]).abs()).sum();
                close(s1[h * stride + j], s2[h * stride + j], mag, &format!("scores dim {dim} h {h} j {j}"));
            }
        }

        let p: Vec<f32> = rng.vec(g * stride, 1.0).iter().map(|x| x.abs()).collect();
        let v = rng.vec(n * dim, 1.0);
        let acc0 = rng.vec(g * dim, 1.0);
        let (mut a1, mut a2) = (acc0.clone(), acc0.clone());
        isa.pv(&p, stride, g, &v, n, dim, &mut a1, &mut Prefetch::none());
        port.pv(&p, stride, g, &v, n, dim, &mut a2, &mut Prefetch::none());
        for h in 0..g {
            for c in 0..dim {
                let mag = acc0[h * dim + c].abs() + (0..n).map(|j| (p[h * stride + j] * v[j * dim + c]).abs()).sum::<f32>();
                close(a1[h * dim + c], a2[h * dim + c], mag, &format!("pv dim {dim} h {h} col {c}"));
            }
        }

        let x = rng.vec(dim, 30.0);
        assert_eq!(isa.max(&x), port.max(&x), "max dim {dim}");
        let mx = port.max(&x);
        let (mut e1, mut e2) = (x.clone(), x.clone());
        let (t1, t2) = (isa.exp_sum(&mut e1, mx), port.exp_sum(&mut e2, mx));
        close(t1, t2, t2, &format!("exp sum dim {dim}"));
        for (a, b) in e1.iter().zip(&e2) {
            close(*a, *b, *b, &format!("exp dim {dim}"));
        }

        let (mut y1, mut y2) = (acc0[..dim].to_vec(), acc0[..dim].to_vec());
        isa.axpy(&mut y1, 0.37, &x);
        port.axpy(&mut y2, 0.37, &x);
        for ((a, b), (y0, xi)) in y1.iter().zip(&y2).zip(acc0.iter().zip(&x)) {
            close(*a, *b, y0.abs() + (0.37 * xi).abs(), &format!("axpy dim {dim}"));
        }
        isa.scale(&mut y1, 1.7);
        port.scale(&mut y2, 1.7);
        for (a, b) in y1.iter().zip(&y2) {
            close(*a, *b, 4.0 * b.abs(), &format!("scale dim {dim}"));
        }

        // Conversions are exact: equal bits.
        let hb: Vec<half::bf16> = x.iter().map(|&v| half::bf16::from_f32(v)).collect();
        let hf: Vec<half::f16> = x.iter().map(|&v| half::f16::from_f32(v * 1e-4)).collect();
        let (mut b1, mut b2) = (vec![0f32; dim], vec![0f32; dim]);
        assert_eq!(isa.to_f32(&hb, &mut b1).to_vec(), port.to_f32(&hb, &mut b2).to_vec(), "bf16 dim {dim}");
        assert_eq!(isa.to_f32(&hf, &mut b1).to_vec(), port.to_f32(&hf, &mut b2).to_vec(), "f16 dim {dim}");
    }
}

/// A score or a P.V column gets the same bits whichever keys share its register
/// block or tile (what keeps a query's output independent of batching and chunking).
#[test]
fn simd_blocking_does_not_change_bits() {
    let Some(isa) = simd() else { return };
    let mut rng = Rng(7);
    for dim in [8, 24, 60, 128] {
        for g in [1, 7, 16, 21, 40] {
            let n = 19;
            let q = rng.vec(g * dim, 1.0);
            let k: Vec<half::bf16> = rng.vec(n * dim, 1.0).iter().map(|&x| half::bf16::from_f32(x)).collect();
            let mut buf = vec![0f32; 32 * dim];
            let mut all = vec![0f32; g * n];
            isa.scores(&q, g, dim, isa.k_tile(&k, dim, &mut buf), n, &mut all, n, &mut Prefetch::new(&k));
            for (j0, j1) in [(0, 1), (1, 4), (4, 13), (13, 19)] {
                let mut part = vec![0f32; g * n];
                let kt = isa.k_tile(&k[j0 * dim..j1 * dim], dim, &mut buf);
                isa.scores(&q, g, dim, kt, j1 - j0, &mut part, n, &mut Prefetch::none());
                for h in 0..g {
                    for j in j0..j1 {
                        assert_eq!(part[h * n + j - j0].to_bits(), all[h * n + j].to_bits(), "dim {dim} g {g} h {h} j {j}");
                    }
                }
            }
            let v = rng.vec(n * dim, 1.0);
            let mut acc = vec![0f32; g * dim];
            isa.pv(&all, n, g, &v, n, dim, &mut acc, &mut Prefetch::new(&q));
            for h in 0..g {
                let mut one = vec![0f32; dim];
                isa.pv(&all[h * n..][..n], n, 1, &v, n, dim, &mut one, &mut Prefetch::none());
                assert_eq!(one, acc[h * dim..][..dim].to_vec(), "pv dim {dim} g {g} h {h}");
            }
        }
    }
}

#[test]
fn exp_is_accurate() {
    let Some(isa) = simd() else { return };
    let mut xs: Vec<f32> = (0..20000).map(|i| -87.0 + i as f32 * (87.0 + 80.0) / 20000.0).collect();
    xs.extend([0.0, -0.0, -1e-30, 1e-30, 88.0]);
    let mut e = xs.clone();
    isa.exp_sum(&mut e, 0.0);
    for (x, y) in xs.iter().zip(&e) {
        let want = (*x as f64).exp();
        assert!(((*y as f64) - want).abs() <= 3.0 * f32::EPSILON as f64 * want, "exp({x}) = {y}, want {want}");
    }
    let mut nan = [f32::NAN; 9];
    assert!(isa.exp_sum(&mut nan, 0.0).is_nan());
}

/// In-cache rates of the SIMD kernels on one tile (G = 16, DK = DV = 128, TILE keys):
/// `cargo test --release --lib kernel_rates -- --ignored --nocapture`.
#[cfg(test)]
mod rates {
    use super::*;

    #[test]
    #[ignore]
    fn kernel_rates() {
        let isa = Isa::get();
        let (g, n, d) = (16usize, TILE, 128usize);
        let q: Vec<f32> = (0..g * d).map(|i| (i % 7) as f32 * 0.01).collect();
        let kf: Vec<f32> = (0..n * d).map(|i| (i % 5) as f32 * 0.01).collect();
        let kb: Vec<half::bf16> = kf.iter().map(|&x| half::bf16::from_f32(x)).collect();
        let (mut s, mut acc, mut buf, mut kt) = (vec![0f32; g * n], vec![0f32; g * d], vec![0f32; n * d], vec![0f32; n * d]);
        isa.k_tile(&kf, d, &mut kt);
        println!("{} kernels, {g} heads x {n} keys x {d} dims:", isa.name());
        for which in ["scores", "pv", "exp_sum", "k_tile (bf16)", "to_f32 (bf16)"] {
            let reps = 50_000;
            let t = std::time::Instant::now();
            for _ in 0..reps {
                match which {
                    "scores" => isa.scores(&q, g, d, &kt, n, &mut s, n, &mut Prefetch::none()),
                    "pv" => isa.pv(&s, n, g, &kf, n, d, &mut acc, &mut Prefetch::none()),
                    "exp_sum" => {
                        s.fill(0.5);
                        for h in 0..g {
                            std::hint::black_box(isa.exp_sum(&mut s[h * n..][..n], 1.0));
                        }
                    }
                    "k_tile (bf16)" => {
                        std::hint::black_box(isa.k_tile(&kb, d, &mut buf));
                    }
                    _ => {
                        std::hint::black_box(isa.to_f32(&kb, &mut buf));
                    }
                }
                std::hint::black_box((&mut s, &mut acc));
            }
            let dt = t.elapsed().as_secs_f64() / reps as f64;
            println!("  {which:14} {:6.2} us/tile  ({:.0} GFLOP/s for a G x TILE x D product)", dt * 1e6, (2 * g * n * d) as f64 / dt / 1e9);
        }
    }
}
