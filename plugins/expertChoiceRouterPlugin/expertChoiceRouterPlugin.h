/*
 * ExpertChoiceRouter (namespace "nucleus", version "1"): IPluginV3 glue over expertChoiceRouterKernel.h.
 *
 *   input   router_logits [B, S, E]  float32 / float16 / bfloat16
 *   output  token_indices [B, E, C]  int64
 *   output  gating        [B, E, C]  float32
 *   attributes capacity_numerator (int), capacity_denominator (int), score_function ("softmax" | "sigmoid"),
 *              route_scale (float); C = max(1, ceil(num * S / (den * E))).
 */
#ifndef NUCLEUS_EXPERT_CHOICE_ROUTER_PLUGIN_H
#define NUCLEUS_EXPERT_CHOICE_ROUTER_PLUGIN_H

#include <NvInferRuntime.h>

#include <string>
#include <vector>

namespace nucleus
{
namespace plugin
{

struct ExpertChoiceRouterParams
{
    int32_t capacityNumerator{0};
    int32_t capacityDenominator{0};
    std::string scoreFunction; // "softmax" or "sigmoid"
    float routeScale{1.0F};
};

class ExpertChoiceRouterPlugin : public nvinfer1::IPluginV3,
                                 public nvinfer1::IPluginV3OneCore,
                                 public nvinfer1::IPluginV3OneBuild,
                                 public nvinfer1::IPluginV3OneRuntime
{
public:
    //! Validates params (throws PluginError with a message naming the attribute).
    explicit ExpertChoiceRouterPlugin(ExpertChoiceRouterParams params);
    ~ExpertChoiceRouterPlugin() override = default;

    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
    nvinfer1::IPluginV3* clone() noexcept override;

    // IPluginV3OneCore
    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;

    // IPluginV3OneBuild
    int32_t getNbOutputs() const noexcept override;
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
        nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
        int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
        nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
        int32_t nbOutputs) noexcept override;
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;

    // IPluginV3OneRuntime
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const* out,
        int32_t nbOutputs) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

private:
    ExpertChoiceRouterParams mParams;
    std::vector<nvinfer1::PluginField> mSerialFields;
    nvinfer1::PluginFieldCollection mSerialCollection{};
};

class ExpertChoiceRouterPluginCreator : public nvinfer1::IPluginCreatorV3One
{
public:
    ExpertChoiceRouterPluginCreator();
    ~ExpertChoiceRouterPluginCreator() override = default;

    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;
    nvinfer1::IPluginV3* createPlugin(
        char const* name, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase phase) noexcept override;

private:
    std::vector<nvinfer1::PluginField> mFieldNames;
    nvinfer1::PluginFieldCollection mFieldCollection{};
};

} // namespace plugin
} // namespace nucleus

#endif // NUCLEUS_EXPERT_CHOICE_ROUTER_PLUGIN_H
